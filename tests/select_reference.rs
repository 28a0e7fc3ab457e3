//! The SnapKV-family CPU reference (the oracle for the selection kernel) on cases checkable by
//! hand.

use half::f16;
use headwise::reference::{GqaReduce, Pool, select_positions, snapkv_scores};

fn h(v: &[f32]) -> Vec<f16> {
    v.iter().map(|&x| f16::from_f32(x)).collect()
}

#[test]
fn one_window_query_without_pooling_is_its_softmax() {
    // q = 4 keys, D = 1 (scale 1), W = 1: the window query sees every key, so the 3 prefix
    // scores plus the window key's probability sum to 1, in softmax proportions.
    let k = h(&[0.0, 1.0, 2.0, 0.5]);
    let q = h(&[1.0]);
    let s = snapkv_scores(&k, &q, 1, 1, 1, Pool::Max, GqaReduce::Mean);
    let z: f64 = [0.0f64, 1.0, 2.0, 0.5].iter().map(|x| x.exp()).sum();
    for (j, want) in [0.0f64, 1.0, 2.0].iter().map(|x| x.exp() / z).enumerate() {
        assert!((s[j] - want).abs() < 1e-12, "{j}: {} vs {want}", s[j]);
    }
}

#[test]
fn causal_mask_inside_the_window_and_group_reduction() {
    // W = 2: window query 0 must not see window key 1. Give window key 1 a huge logit: query 0's
    // row is unaffected, query 1's row is dominated by it.
    let k = h(&[1.0, 0.0, 0.0, 8.0]);
    let q = h(&[1.0, 1.0]);
    let s = snapkv_scores(&k, &q, 1, 2, 1, Pool::Max, GqaReduce::Mean);
    let row0 = [1.0f64, 0.0, 0.0].map(f64::exp);
    let z0: f64 = row0.iter().sum();
    let row1 = [1.0f64, 0.0, 0.0, 8.0].map(f64::exp);
    let z1: f64 = row1.iter().sum();
    let want = [(row0[0] / z0 + row1[0] / z1) / 2.0, (row0[1] / z0 + row1[1] / z1) / 2.0];
    assert!((s[0] - want[0]).abs() < 1e-12 && (s[1] - want[1]).abs() < 1e-12, "{s:?} vs {want:?}");
    // Two query heads (G = 2): mean and max of their scores.
    let q2 = h(&[1.0, 1.0, -1.0, -1.0]);
    let a = snapkv_scores(&k, &q2[..2], 1, 2, 1, Pool::Max, GqaReduce::Mean);
    let b = snapkv_scores(&k, &q2[2..], 1, 2, 1, Pool::Max, GqaReduce::Mean);
    let mean = snapkv_scores(&k, &q2, 1, 2, 1, Pool::Max, GqaReduce::Mean);
    let max = snapkv_scores(&k, &q2, 1, 2, 1, Pool::Max, GqaReduce::Max);
    for j in 0..2 {
        assert!((mean[j] - (a[j] + b[j]) / 2.0).abs() < 1e-12);
        assert_eq!(max[j], a[j].max(b[j]));
    }
}

#[test]
fn pooling_edges() {
    // 5 equal keys, W = 1: every prefix score is 1/5. Avg pool k = 3 counts the zero padding at
    // the edges (2/3 of the inner value); max pool ignores it.
    let k = h(&[0.0; 5]);
    let q = h(&[1.0]);
    let avg = snapkv_scores(&k, &q, 1, 1, 3, Pool::Avg, GqaReduce::Mean);
    let max = snapkv_scores(&k, &q, 1, 1, 3, Pool::Max, GqaReduce::Mean);
    let p = 0.2;
    for (j, want) in [2.0 * p / 3.0, p, p, 2.0 * p / 3.0].iter().enumerate() {
        assert!((avg[j] - want).abs() < 1e-12, "avg {j}");
        assert!((max[j] - p).abs() < 1e-12, "max {j}");
    }
}

#[test]
fn selection_keeps_window_orders_by_position_and_breaks_ties_low() {
    let scores = [0.5, 0.9, 0.5, f64::NAN, 0.5, 0.1];
    // budget 5, window 2: 3 prefix tokens: 1 (0.9), then the tied 0.5s at 0 and 2 (not 4).
    assert_eq!(select_positions(&scores, 2, 5), vec![0, 1, 2, 6, 7]);
    // The NaN ranks below 0.1.
    assert_eq!(select_positions(&scores, 2, 7), vec![0, 1, 2, 4, 5, 6, 7]);
    // Budget >= q keeps all; budget == window keeps only the window.
    assert_eq!(select_positions(&scores, 2, 8), (0..8).collect::<Vec<_>>());
    assert_eq!(select_positions(&scores, 2, 2), vec![6, 7]);
}
