//! The chunk entry points (issue 17): `LayerCache::append_tokens`, `attention_chunk` and
//! `rollback`, each with one known fault per case on the random valid layouts of
//! `cache_layout()`, and launching controls. Part of tests/invalid_inputs.rs.

use super::*;
use headwise::attention::MAX_CHUNK_QUERIES;

#[derive(Clone, Debug)]
enum AppendFault {
    Tokens(usize),
    KNew(u32),
    VNew(u32),
    /// As many tokens as the first Full segment has free rows, plus `extra`.
    NoRoom(u32),
}

pub(super) fn cache_append_tokens(b: &mut Battery) {
    let fault = prop_oneof![
        prop_oneof![Just(0usize), (i32::MAX as usize + 1)..usize::MAX, Just(usize::MAX)]
            .prop_map(AppendFault::Tokens),
        any::<u32>().prop_map(AppendFault::KNew),
        any::<u32>().prop_map(AppendFault::VNew),
        (0u32..5).prop_map(AppendFault::NoRoom),
    ];
    b.run(
        "LayerCache::append_tokens",
        2_000,
        (cache_layout(), 1usize..6, fault),
        |p, (layout, tokens, fault)| {
            let s = store(p);
            let d = 64;
            let n = layout.segments().len();
            let mut cache = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
            let mut t = tokens;
            let want = |t: usize| n * t * d;
            let (mut k_len, mut v_len) = (want(t), want(t));
            let expect = match fault {
                AppendFault::Tokens(bad) => {
                    t = bad;
                    invalid("tokens")
                }
                AppendFault::KNew(x) => {
                    k_len = wrong_len(k_len, n * t, x);
                    invalid("k_new")
                }
                AppendFault::VNew(x) => {
                    v_len = wrong_len(v_len, n * t, x);
                    invalid("v_new")
                }
                AppendFault::NoRoom(extra) => {
                    // cache_layout()'s first segment is full: a Full one has no room for any.
                    let Some((i, free)) = layout
                        .segments()
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.mode == SegmentMode::Full)
                        .map(|(i, s)| (i, s.capacity - s.len))
                        .min_by_key(|&(i, free)| (free, i))
                    else {
                        return Ok(());
                    };
                    t = free as usize + 1 + extra as usize;
                    // The first Full segment short of t rows is the one named.
                    let first = layout
                        .segments()
                        .iter()
                        .position(|s| s.mode == SegmentMode::Full && ((s.capacity - s.len) as usize) < t)
                        .unwrap_or(i);
                    k_len = want(t);
                    v_len = want(t);
                    Expect::SegmentFull(first)
                }
            };
            let (kn, vn) = (s.zeros::<bf16>(k_len).unwrap(), s.zeros::<bf16>(v_len).unwrap());
            p.call(expect, || cache.append_tokens(&kn, &vn, t))?;
            check(cache.layout() == &layout, || "a failed append_tokens changed the layout".into())
        },
    );
    b.controls("LayerCache::append_tokens", |p| {
        let s = store(p);
        let layout =
            LayoutBuilder::new(1, 2).full(0, 0, 1).streaming(0, 1, 1, 2).headroom(3).build().unwrap();
        let mut cache = LayerCache::<_, bf16>::new(&s, layout, 64).unwrap();
        let t = s.upload(&vec![bf16::ONE; 3 * 2 * 64]).unwrap();
        let before = p.launches.get();
        p.call(Expect::Ok, || cache.append_tokens(&t, &t, 3))?;
        check(p.launches.get() == before + 1, || "a valid append_tokens did not launch exactly once".into())?;
        let lens: Vec<u32> = cache.layout().segments().iter().map(|s| s.len).collect();
        check(lens == [4, 3], || format!("lens {lens:?}"))
    });
}

#[derive(Clone, Debug)]
enum ChunkFault {
    QLen(usize),
    /// A fault of the arguments every attention entry point takes.
    Args(AttentionFault),
    /// No fault in the arguments: the layout alone decides (too short a segment or window).
    None,
}

pub(super) fn cache_attention_chunk(b: &mut Battery) {
    let fault = prop_oneof![
        1 => prop_oneof![Just(0usize), MAX_CHUNK_QUERIES + 1..1000, Just(usize::MAX)].prop_map(ChunkFault::QLen),
        6 => attention_fault().prop_map(ChunkFault::Args),
        1 => Just(ChunkFault::None),
    ];
    b.run(
        "LayerCache::attention_chunk",
        2_500,
        (cache_layout(), 2usize..=MAX_CHUNK_QUERIES, 1usize..=MAX_GROUP, fault),
        |p, (layout, q_len, g, fault)| {
            let s = store(p);
            let d = 64;
            let cache = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
            let mut ql = q_len;
            let rows = layout.segments().len() * g * q_len;
            let mut a = AttentionArgs::new(rows, d, g, true);
            let field = match &fault {
                ChunkFault::QLen(bad) => {
                    ql = *bad;
                    Some("q_len")
                }
                ChunkFault::Args(f) => Some(a.apply(f, rows)),
                ChunkFault::None => None,
            };
            // The layout is checked right after q_len's range: a segment shorter than the chunk
            // or a ring narrower than it is reported before any other argument.
            let unfit = layout.segments().iter().any(|s| {
                (s.len as usize) < q_len
                    || matches!(s.mode, SegmentMode::Streaming { window, .. } if (window as usize) < q_len)
            });
            let expect = match (field, unfit) {
                (Some("q_len"), _) => invalid("q_len"),
                (_, true) => invalid("q_len"),
                (Some(f), false) => invalid(f),
                (None, false) => Expect::Ok,
            };
            let q = s.zeros::<bf16>(a.q).unwrap();
            let mut out = s.zeros::<bf16>(a.out).unwrap();
            let mut lse = a.lse.map(|n| s.zeros::<f32>(n).unwrap());
            let mut ws = AttentionWorkspace::new();
            p.call(expect, || {
                cache.attention_chunk(&q, ql, a.group, &mut out, lse.as_mut(), &mut ws, &a.opts)
            })?;
            Ok(())
        },
    );
    b.controls("LayerCache::attention_chunk", |p| {
        // Controls: a chunk of 3 over a Full segment and a ring, unsplit and split (+ merge).
        let s = store(p);
        let layout =
            LayoutBuilder::new(1, 2).full(0, 0, 9).streaming(0, 1, 1, 4).headroom(4).build().unwrap();
        let mut cache = LayerCache::<_, bf16>::new(&s, layout, 64).unwrap();
        let t = s.upload(&vec![bf16::ONE; 4 * 2 * 64]).unwrap();
        cache.append_tokens(&t, &t, 4).unwrap();
        let q = s.upload(&vec![bf16::ONE; 3 * 2 * 2 * 64]).unwrap();
        let mut ws = AttentionWorkspace::new();
        for (chunk, launches) in [(None, 1), (Some(4), 2)] {
            let mut out = s.upload(&vec![bf16::NAN; 3 * 2 * 2 * 64]).unwrap();
            let opts = AttentionOptions { chunk_tokens: chunk, scale: None };
            let before = p.launches.get();
            p.call(Expect::Ok, || cache.attention_chunk(&q, 3, 2, &mut out, None, &mut ws, &opts))?;
            check(p.launches.get() == before + launches, || format!("{chunk:?}: not {launches} launch(es)"))?;
            let out = s.download(&out).unwrap();
            check(out.iter().all(|x| !x.is_nan()), || "an output was left unwritten".into())?;
        }
        Ok(())
    });
}

pub(super) fn cache_rollback(b: &mut Battery) {
    // Counts: one per sequence (or a wrong number of them), some above what a segment holds.
    let counts = (0usize..4, proptest::collection::vec(0u32..40, 0..6), any::<bool>());
    b.run("LayerCache::rollback", 3_000, (cache_layout(), counts), |p, (layout, (extra, c, wrong_count))| {
        let s = store(p);
        let mut cache = LayerCache::<_, bf16>::new(&s, layout.clone(), 64).unwrap();
        let (batch, kvh) = (layout.batch(), layout.kv_heads());
        let mut tokens: Vec<u32> = (0..batch).map(|b| c.get(b).copied().unwrap_or(0)).collect();
        if wrong_count {
            tokens.resize(batch + 1 + extra, 1);
            if extra % 2 == 1 && batch > 0 {
                tokens.truncate(batch - 1);
            }
        }
        let expect = if tokens.len() != batch {
            invalid("tokens")
        } else {
            match layout.segments().iter().enumerate().find(|(i, s)| tokens[i / kvh] > s.len) {
                Some((i, _)) => invalid(format!("tokens[{}]", i / kvh)),
                None => Expect::Ok,
            }
        };
        let failed = !matches!(expect, Expect::Ok);
        let before = p.launches.get();
        p.call(expect, || cache.rollback(&tokens))?;
        check(p.launches.get() == before, || "rollback launched a kernel".into())?;
        if failed {
            check(cache.layout() == &layout, || "a failed rollback changed the layout".into())?;
        } else {
            for (i, (a, b)) in layout.segments().iter().zip(cache.layout().segments()).enumerate() {
                check(b.len == a.len - tokens[i / kvh], || format!("segment {i}: {a:?} -> {b:?}"))?;
            }
            let table = s.download(cache.device_table()).unwrap();
            check(table == cache.layout().device_table(), || "device table not rewritten".into())?;
        }
        Ok(())
    });
}
