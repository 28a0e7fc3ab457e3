//! Expected Attention scores (src/scores.rs, cuda/scores.cu) through the emulator against the
//! f64 reference, every dtype and head_dim, with and without the covariance and the value norm,
//! then fed to the selection primitive; bad inputs are named errors.
#![cfg(feature = "emulator")]

mod common;

use half::{bf16, f16};
use headwise::layout::{LayerLayout, Segment};
use headwise::scores::{ExpectedAttention, ScoreWorkspace, expected_attention};
use headwise::select::{Budgets, Prompt, SelectOptions, SelectWorkspace, compress_into_scored};
use headwise::{EmuStore, Error, KvElem, LayerCache, Store, reference};

fn case<T: KvElem>(head_dim: usize, group: usize, seed: u64) {
    let store = EmuStore;
    let (batch, kv_heads, q, window) = (2usize, 2usize, 37usize, 5usize);
    let (segments, d, n) = (batch * kv_heads, head_dim, q - window);
    let k_host = common::values::<T>(seed, segments * q * d, 1.0);
    let v_host = common::values::<T>(seed ^ 7, segments * q * d, 1.0);
    let mean: Vec<f32> =
        common::values::<T>(seed ^ 11, segments * group * d, 2.0).iter().map(|x| x.to_f32()).collect();
    // A symmetric positive semi-definite covariance per head: A A^T / d.
    let a: Vec<f32> =
        common::values::<T>(seed ^ 13, segments * group * d * d, 1.0).iter().map(|x| x.to_f32()).collect();
    let mut cov = vec![0.0f32; segments * group * d * d];
    for h in 0..segments * group {
        let m = &a[h * d * d..(h + 1) * d * d];
        for i in 0..d {
            for j in 0..d {
                cov[h * d * d + i * d + j] =
                    (0..d).map(|l| m[i * d + l] * m[j * d + l]).sum::<f32>() / d as f32;
            }
        }
    }
    let (k, v, none) =
        (store.upload(&k_host).unwrap(), store.upload(&v_host).unwrap(), store.zeros::<T>(0).unwrap());
    let prompt = Prompt {
        k: &k,
        v: &v,
        queries: &none,
        batch,
        kv_heads,
        group_size: group,
        q_len: q,
        head_dim: d,
        packing: Default::default(),
    };
    let (mean_b, cov_b) = (store.upload(&mean).unwrap(), store.upload(&cov).unwrap());
    let mut ws = ScoreWorkspace::new();
    for (use_cov, use_vnorm, sink) in [(true, true, 4usize), (false, true, 0), (true, false, 1)] {
        let opts = ExpectedAttention { sink, use_vnorm, ..ExpectedAttention::default() };
        let mut out = store.zeros::<f32>(segments * n).unwrap();
        expected_attention(
            &store,
            &prompt,
            &mean_b,
            use_cov.then_some(&cov_b),
            window,
            &opts,
            &mut out,
            &mut ws,
        )
        .unwrap();
        let got = store.download(&out).unwrap();
        let label = format!("d{d} cov {use_cov} vnorm {use_vnorm} sink {sink}");
        for s in 0..segments {
            let want = reference::expected_attention_scores(
                &k_host[s * q * d..(s + 1) * q * d],
                &v_host[s * q * d..(s + 1) * q * d],
                &mean[s * group * d..(s + 1) * group * d],
                if use_cov { &cov[s * group * d * d..(s + 1) * group * d * d] } else { &[] },
                d,
                window,
                sink,
                opts.epsilon,
                use_vnorm,
            );
            for t in 0..n {
                let (g, w) = (f64::from(got[s * n + t]), want[t]);
                if w.is_infinite() {
                    assert!(g.is_infinite() && g > 0.0, "{label}: segment {s} token {t}: {g} for a sink");
                } else {
                    assert!(
                        (g - w).abs() <= 2e-4 * w.abs() + 1e-7,
                        "{label}: segment {s} token {t}: {g} vs {w}"
                    );
                }
            }
        }
        // Fed to the primitive: the sinks and the window are kept, the rest by score.
        let budget = (sink + window + 6) as u32;
        let segs = (0..segments).map(|r| Segment::full((r * q) as u32, q as u32, 0)).collect();
        let layout = LayerLayout::new(batch, kv_heads, (segments * q) as u64, segs).unwrap();
        let mut dest = LayerCache::<_, T>::new(&store, layout, d).unwrap();
        let sel = SelectOptions { window, pool_kernel: 1, ..SelectOptions::default() };
        let mut sws = SelectWorkspace::new();
        compress_into_scored(&mut dest, &prompt, &out, Budgets::PerRow(&[budget; 4]), &sel, &mut sws)
            .unwrap();
        for (s, kept) in sws.kept(&store).unwrap().iter().enumerate() {
            let scores: Vec<f64> = got[s * n..(s + 1) * n].iter().map(|&x| f64::from(x)).collect();
            let want: Vec<u32> = reference::select_positions(&scores, window, budget as usize)
                .into_iter()
                .map(|p| p as u32)
                .collect();
            assert_eq!(kept, &want, "{label}: segment {s}");
            assert!((0..sink as u32).all(|t| kept.contains(&t)), "{label}: sinks kept");
        }
    }
    // Bad inputs are named before any launch.
    let field = |r: headwise::Result<()>| match r {
        Err(Error::Invalid { field, .. }) => field,
        other => panic!("expected Error::Invalid, got {other:?}"),
    };
    let mut out = store.zeros::<f32>(segments * n).unwrap();
    let o = ExpectedAttention::default();
    let short = store.zeros::<f32>(segments * group * d - 1).unwrap();
    assert_eq!(
        field(expected_attention(&store, &prompt, &short, None, window, &o, &mut out, &mut ws)),
        "mean"
    );
    assert_eq!(
        field(expected_attention(&store, &prompt, &mean_b, Some(&mean_b), window, &o, &mut out, &mut ws)),
        "cov"
    );
    let far = ExpectedAttention { sink: q, ..o };
    assert_eq!(
        field(expected_attention(&store, &prompt, &mean_b, None, window, &far, &mut out, &mut ws)),
        "sink"
    );
    assert_eq!(field(expected_attention(&store, &prompt, &mean_b, None, 0, &o, &mut out, &mut ws)), "window");
    let mut wrong = store.zeros::<f32>(segments * n + 1).unwrap();
    assert_eq!(
        field(expected_attention(&store, &prompt, &mean_b, None, window, &o, &mut wrong, &mut ws)),
        "scores"
    );
    let nan = ExpectedAttention { epsilon: f32::NAN, ..o };
    assert_eq!(
        field(expected_attention(&store, &prompt, &mean_b, None, window, &nan, &mut out, &mut ws)),
        "epsilon"
    );
}

#[test]
fn expected_attention_every_dtype_and_head_dim() {
    for d in headwise::dtype::SUPPORTED_HEAD_DIMS {
        case::<f16>(d, 2, 3 + d as u64);
        case::<bf16>(d, 2, 5 + d as u64);
    }
    for g in [1, 4, 8] {
        case::<bf16>(64, g, 7 + g as u64);
    }
}
