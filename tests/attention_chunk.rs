//! Attention of a chunk of `q_len > 1` queries per sequence over the ragged cache, the
//! multi-token append that puts the chunk there, and the rollback of rejected draft tokens
//! (issue 17 item 2), through the emulator against the f64 reference and an independent model of
//! each segment's tokens.
#![cfg(feature = "emulator")]

mod common;

use common::chunk::{Model, check_against_model, chunk_layout, chunk_rows, chunk_scenario};
use half::{bf16, f16};
use headwise::attention::MAX_CHUNK_QUERIES;
use headwise::layout::{LayerLayout, Segment};
use headwise::{AttentionOptions, AttentionWorkspace, EmuStore, Error, LayerCache, Store};
use proptest::prelude::*;

/// Every head_dim x dtype x group size (1, 4, 8, 16) with chunks of 2..64 queries, unsplit and
/// split into chunks of 37 tokens (a chunk that a causal row does not reach merges as empty),
/// and both tile sizes (8 and 16 query rows) at every head_dim and dtype.
#[test]
fn every_head_dim_dtype_and_group() {
    let q_lens = [2usize, 5, 16, 64, 3];
    let mut c = 0;
    for d in [64, 128, 256] {
        for group in [1, 4, 8, 16] {
            let q_len = q_lens[c % q_lens.len()];
            c += 1;
            let layout = chunk_layout(q_len as u32);
            for (i, chunk) in [None, Some(37)].into_iter().enumerate() {
                let opts = AttentionOptions { chunk_tokens: chunk, scale: None };
                let seed = (d * 1000 + group * 10 + i) as u64;
                chunk_scenario::<_, f16>(&EmuStore, &layout, d, group, q_len, opts, true, seed);
                chunk_scenario::<_, bf16>(&EmuStore, &layout, d, group, q_len, opts, i == 0, seed + 1);
            }
        }
        // The 8-row tile (G * q_len <= 8) at this head_dim in both dtypes, whatever the cycle
        // above picked (at d256 it picks only 16-row tiles).
        let layout = chunk_layout(4);
        let opts = AttentionOptions::default();
        chunk_scenario::<_, f16>(&EmuStore, &layout, d, 2, 4, opts, true, d as u64 + 7);
        chunk_scenario::<_, bf16>(&EmuStore, &layout, d, 2, 4, opts, true, d as u64 + 8);
    }
}

/// Every chunk length the API takes, 1..=64, at one head_dim and an odd group.
#[test]
fn every_q_len() {
    for q_len in 1..=MAX_CHUNK_QUERIES {
        let layout = chunk_layout(q_len as u32);
        let opts = AttentionOptions { chunk_tokens: (q_len % 3 == 0).then_some(64), scale: Some(0.1) };
        chunk_scenario::<_, bf16>(&EmuStore, &layout, 64, 3, q_len, opts, true, q_len as u64);
    }
}

/// `append_tokens(n)` leaves the cache byte-identical to `n` single appends, and the layouts
/// equal, for Full segments and rings (filling, wrapping inside the chunk, and given more tokens
/// than their window).
#[test]
fn append_tokens_equals_single_appends() {
    let d = 128;
    let build = || {
        let segs = vec![
            Segment::full(0, 40, 3),
            Segment::streaming(40, 2, 5),
            Segment { len: 9, ring_head: 3, ..Segment::streaming(47, 2, 7) },
            Segment::full(56, 30, 0),
        ];
        LayerLayout::new(2, 2, 86, segs).unwrap()
    };
    for tokens in [1usize, 2, 4, 6, 9] {
        let mut a = LayerCache::<_, f16>::new(&EmuStore, build(), d).unwrap();
        let mut b = LayerCache::<_, f16>::new(&EmuStore, build(), d).unwrap();
        let mut next = 1;
        let (k, v, _) = chunk_rows::<f16>(a.layout(), d, tokens, &mut next);
        a.append_tokens(&EmuStore.upload(&k).unwrap(), &EmuStore.upload(&v).unwrap(), tokens).unwrap();
        // The same rows one token at a time: token t of every segment is [batch][kv_heads] rows.
        let (batch, kvh) = (2, 2);
        for t in 0..tokens {
            let pick = |x: &[f16]| -> Vec<f16> {
                (0..batch)
                    .flat_map(|bb| {
                        let first = ((bb * tokens + t) * kvh) * d;
                        x[first..first + kvh * d].to_vec()
                    })
                    .collect()
            };
            b.append(&EmuStore.upload(&pick(&k)).unwrap(), &EmuStore.upload(&pick(&v)).unwrap()).unwrap();
        }
        assert_eq!(a.layout(), b.layout(), "tokens {tokens}");
        let bits = |x: Vec<f16>| x.into_iter().map(f16::to_bits).collect::<Vec<_>>();
        assert_eq!(
            bits(EmuStore.download(a.k()).unwrap()),
            bits(EmuStore.download(b.k()).unwrap()),
            "K, tokens {tokens}"
        );
        assert_eq!(
            bits(EmuStore.download(a.v()).unwrap()),
            bits(EmuStore.download(b.v()).unwrap()),
            "V, tokens {tokens}"
        );
        // The device table the kernel advanced equals the host's.
        assert_eq!(
            EmuStore.download(a.device_table()).unwrap(),
            a.layout().device_table(),
            "tokens {tokens}"
        );
    }
}

#[derive(Clone, Debug)]
enum Step {
    Append(usize),
    /// Roll back this many tokens per sequence (clamped to what the model holds).
    Rollback(Vec<u32>),
    Regrow(u32),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (1usize..8).prop_map(Step::Append),
        2 => proptest::collection::vec(0u32..8, 2).prop_map(Step::Rollback),
        1 => (0u32..4).prop_map(Step::Regrow),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(if std::env::var_os("HEADWISE_BIG_SWEEPS").is_some() { 256 } else { 32 }))]

    /// Random schedules of multi-token appends, rollbacks and regrows over Full segments and
    /// rings: after every step each segment's logical tokens are byte-identical to an
    /// independent model's (append pushes, a full ring drops its oldest windowed token,
    /// rollback truncates), and the device table equals the host layout. Appends that would
    /// overflow a Full segment are errors that change nothing.
    #[test]
    fn schedules_match_the_model(steps in proptest::collection::vec(step(), 1..14), d in prop::sample::select(vec![64usize, 256])) {
        let segs = vec![
            Segment::full(0, 24, 0),
            Segment::streaming(24, 2, 6),
            Segment::streaming(32, 0, 5),
            Segment::full(37, 10, 0),
        ];
        let layout = LayerLayout::new(2, 2, 47, segs).unwrap();
        let mut models: Vec<Model> = layout.segments().iter().map(|s| Model { mode: s.mode, tokens: vec![] }).collect();
        let mut cache = LayerCache::<_, bf16>::new(&EmuStore, layout, d).unwrap();
        let mut next = 1;
        for (i, st) in steps.iter().enumerate() {
            match st {
                Step::Append(n) => {
                    let (k, v, ids) = chunk_rows::<bf16>(cache.layout(), d, *n, &mut next);
                    let before = cache.layout().clone();
                    let r = cache.append_tokens(&EmuStore.upload(&k).unwrap(), &EmuStore.upload(&v).unwrap(), *n);
                    let room = before.segments().iter().all(|s| s.mode != headwise::SegmentMode::Full || s.capacity - s.len >= *n as u32);
                    if room {
                        r.unwrap();
                        for (m, ids) in models.iter_mut().zip(ids) {
                            for id in ids { m.push(id); }
                        }
                    } else {
                        prop_assert!(matches!(r, Err(Error::SegmentFull { .. })), "{r:?}");
                        prop_assert_eq!(cache.layout(), &before);
                    }
                }
                Step::Rollback(n) => {
                    let n: Vec<u32> = (0..2).map(|b| {
                        let most = models[b * 2..b * 2 + 2].iter().map(|m| m.tokens.len() as u32).min().unwrap();
                        n[b].min(most)
                    }).collect();
                    cache.rollback(&n).unwrap();
                    for (s, m) in models.iter_mut().enumerate() {
                        let keep = m.tokens.len() - n[s / 2] as usize;
                        m.tokens.truncate(keep);
                    }
                }
                Step::Regrow(h) => cache.regrow(*h).unwrap(),
            }
            check_against_model(&cache, &models, &format!("step {i} {st:?}"));
            prop_assert_eq!(EmuStore.download(cache.device_table()).unwrap(), cache.layout().device_table());
        }
    }
}

/// A speculative-decoding step end to end: 4 drafts appended, verified by one chunk attention
/// (each draft query equals the reference over the tokens before it and itself), 1 accepted,
/// 3 rolled back, then a decode step attends exactly as if only the accepted draft had ever
/// been appended.
#[test]
fn speculative_step_equals_appending_only_the_accepted() {
    let d = 64;
    let g = 4;
    let segs = vec![Segment::full(0, 40, 0), Segment::streaming(40, 1, 6)];
    let layout = LayerLayout::new(1, 2, 47, segs).unwrap();
    let mut spec = LayerCache::<_, f16>::new(&EmuStore, layout.clone(), d).unwrap();
    let mut plain = LayerCache::<_, f16>::new(&EmuStore, layout, d).unwrap();
    let mut next = 1;
    // 8 tokens: the ring (1 sink + window 6) wraps once, to ring_head 1.
    let (k, v, _) = chunk_rows::<f16>(spec.layout(), d, 8, &mut next);
    for c in [&mut spec, &mut plain] {
        c.append_tokens(&EmuStore.upload(&k).unwrap(), &EmuStore.upload(&v).unwrap(), 8).unwrap();
    }
    assert_eq!(spec.layout().segments()[1].ring_head, 1);
    let mut draft_next = next;
    let (dk, dv, _) = chunk_rows::<f16>(spec.layout(), d, 4, &mut draft_next);
    spec.append_tokens(&EmuStore.upload(&dk).unwrap(), &EmuStore.upload(&dv).unwrap(), 4).unwrap();
    let heads = 2 * g;
    let q = common::values::<f16>(5, 4 * heads * d, 2.0);
    let mut out = EmuStore.zeros::<f16>(4 * heads * d).unwrap();
    let mut ws = AttentionWorkspace::new();
    spec.attention_chunk(
        &EmuStore.upload(&q).unwrap(),
        4,
        g,
        &mut out,
        None,
        &mut ws,
        &AttentionOptions::default(),
    )
    .unwrap();
    let (want, _) = headwise::reference::attention_chunk(
        spec.layout(),
        d,
        &EmuStore.download(spec.k()).unwrap(),
        &EmuStore.download(spec.v()).unwrap(),
        &q,
        4,
        g,
        1.0 / (d as f64).sqrt(),
    );
    let got = EmuStore.download(&out).unwrap();
    for (r, (a, b)) in got.chunks(d).zip(want.chunks(d)).enumerate() {
        let err: f64 = a.iter().zip(b).map(|(x, y)| (f64::from(x.to_f32()) - y).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
        assert!(err <= 1e-3 * norm.max(1e-3), "draft query row {r}: relative error {:.3e}", err / norm);
    }
    spec.rollback(&[3]).unwrap();
    assert_eq!(spec.layout().segments()[1].ring_head, 5, "a wrapped ring keeps its oldest slot");
    // The plain cache appends only the accepted draft (token 0 of the chunk).
    let first = |x: &[f16]| x[..2 * d].to_vec();
    plain.append(&EmuStore.upload(&first(&dk)).unwrap(), &EmuStore.upload(&first(&dv)).unwrap()).unwrap();
    // The ring (window 6) had wrapped: the 3 rejected drafts overwrote 3 of its oldest tokens,
    // so it holds 3 fewer windowed tokens than the plain cache; the Full segment is exact.
    assert_eq!(spec.layout().segments()[0], plain.layout().segments()[0]);
    assert_eq!(spec.layout().segments()[1].len + 3, plain.layout().segments()[1].len);
    let full_rows = |c: &LayerCache<EmuStore, f16>| {
        let s = c.layout().segments()[0];
        let k = EmuStore.download(c.k()).unwrap();
        (0..s.len)
            .flat_map(|i| k[s.row(i) as usize * d..(s.row(i) as usize + 1) * d].to_vec())
            .map(f16::to_bits)
            .collect::<Vec<_>>()
    };
    assert_eq!(full_rows(&spec), full_rows(&plain));
    // After the rollback the ring's newest token is the accepted draft in both caches.
    let newest = |c: &LayerCache<EmuStore, f16>| {
        let s = c.layout().segments()[1];
        let k = EmuStore.download(c.k()).unwrap();
        let r = s.row(s.len - 1) as usize;
        k[r * d..(r + 1) * d].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(newest(&spec), newest(&plain));
    // The next draft goes into the slot of the first rejected one: nothing else moves.
    let (nk, nv, _) = chunk_rows::<f16>(spec.layout(), d, 1, &mut draft_next);
    let before = spec.layout().segments()[1];
    let ring_tokens = |c: &LayerCache<EmuStore, f16>| {
        let s = c.layout().segments()[1];
        let k = EmuStore.download(c.k()).unwrap();
        (0..s.len).map(|i| k[s.row(i) as usize * d..(s.row(i) as usize + 1) * d].to_vec()).collect::<Vec<_>>()
    };
    let old = ring_tokens(&spec);
    spec.append(&EmuStore.upload(&nk).unwrap(), &EmuStore.upload(&nv).unwrap()).unwrap();
    assert_eq!(spec.layout().segments()[1].len, before.len + 1);
    assert_eq!(spec.layout().segments()[1].ring_head, before.ring_head);
    let new = ring_tokens(&spec);
    assert_eq!(new[..old.len()], old[..], "the append overwrote a kept token");
    assert_eq!(new[old.len()], nk[d..2 * d], "the newest token is the appended one");
}

#[test]
fn bad_inputs_are_errors_before_anything_changes() {
    let segs = vec![Segment::full(0, 8, 5), Segment { len: 6, ..Segment::streaming(8, 2, 4) }];
    let layout = LayerLayout::new(1, 2, 14, segs).unwrap();
    let d = 64;
    let mut cache = LayerCache::<_, f16>::new(&EmuStore, layout.clone(), d).unwrap();
    let field = |e: Error| match e {
        Error::Invalid { field, .. } => field,
        e => panic!("{e}"),
    };
    let mut ws = AttentionWorkspace::new();
    let o = AttentionOptions::default();
    let buf = |n: usize| EmuStore.zeros::<f16>(n).unwrap();
    let (g, heads) = (2, 4);
    for q_len in [0, MAX_CHUNK_QUERIES + 1] {
        let r = cache.attention_chunk(&buf(d), q_len, g, &mut buf(d), None, &mut ws, &o);
        assert_eq!(field(r.unwrap_err()), "q_len");
    }
    // q_len 5: the ring's window 4 is too small (the Full segment holds 5).
    let r = cache.attention_chunk(&buf(5 * heads * d), 5, g, &mut buf(5 * heads * d), None, &mut ws, &o);
    assert!(
        matches!(r, Err(Error::Invalid { ref field, ref reason }) if field == "q_len" && reason.contains("window")),
        "{r:?}"
    );
    // q/out/lse lengths count q_len.
    let q = buf(3 * heads * d);
    assert_eq!(
        field(
            cache
                .attention_chunk(&buf(heads * d), 3, g, &mut buf(3 * heads * d), None, &mut ws, &o)
                .unwrap_err()
        ),
        "q"
    );
    assert_eq!(
        field(cache.attention_chunk(&q, 3, g, &mut buf(heads * d), None, &mut ws, &o).unwrap_err()),
        "out"
    );
    let mut lse = EmuStore.zeros::<f32>(heads).unwrap();
    assert_eq!(
        field(
            cache
                .attention_chunk(&q, 3, g, &mut buf(3 * heads * d), Some(&mut lse), &mut ws, &o)
                .unwrap_err()
        ),
        "lse"
    );
    cache.attention_chunk(&q, 3, g, &mut buf(3 * heads * d), None, &mut ws, &o).unwrap();
    // A segment holding fewer tokens than the chunk.
    let short = LayerLayout::new(1, 1, 8, vec![Segment::full(0, 8, 2)]).unwrap();
    let c2 = LayerCache::<_, f16>::new(&EmuStore, short, d).unwrap();
    let r = c2.attention_chunk(&buf(3 * g * d), 3, g, &mut buf(3 * g * d), None, &mut ws, &o);
    assert!(
        matches!(r, Err(Error::Invalid { ref field, ref reason }) if field == "q_len" && reason.contains("len 2")),
        "{r:?}"
    );

    // append_tokens: tokens 0, wrong lengths, and no room (3 free rows in the Full segment).
    let two = buf(2 * d);
    assert_eq!(field(cache.append_tokens(&two, &two, 0).unwrap_err()), "tokens");
    assert_eq!(field(cache.append_tokens(&two, &buf(4 * d), 2).unwrap_err()), "k_new");
    assert_eq!(field(cache.append_tokens(&buf(4 * d), &two, 2).unwrap_err()), "v_new");
    let r = cache.append_tokens(&buf(8 * d), &buf(8 * d), 4);
    assert!(matches!(r, Err(Error::SegmentFull { segment: 0, capacity: 8 })), "{r:?}");
    assert_eq!(cache.layout(), &layout);
    assert_eq!(EmuStore.download(cache.device_table()).unwrap(), layout.device_table());

    // rollback: wrong count, more than a segment holds.
    assert_eq!(field(cache.rollback(&[]).unwrap_err()), "tokens");
    assert_eq!(field(cache.rollback(&[1, 1]).unwrap_err()), "tokens");
    assert_eq!(field(cache.rollback(&[6]).unwrap_err()), "tokens[0]");
    assert_eq!(cache.layout(), &layout);
    cache.rollback(&[5]).unwrap();
    assert_eq!(cache.layout().segments()[0].len, 0);
    // The ring lost its 4 windowed tokens and one sink: ring state back to empty.
    assert_eq!(cache.layout().segments()[1], Segment { len: 1, ..Segment::streaming(8, 2, 4) });
}
