//! `LayerCache` (new, from_parts, append, regrow, relayout_into, attention, attention_with_mass)
//! and the stores, on the launch-counting emulator store. Part of tests/invalid_inputs.rs.

use super::*;

pub(super) fn head_dim_check(b: &mut Battery) {
    let d = prop_oneof![
        any::<usize>(),
        0usize..1024,
        prop::sample::select(vec![0, 1, 8, 32, 63, 65, 96, 127, 129, 192, 255, 257, 512, usize::MAX]),
    ];
    b.run("dtype::check_head_dim", 2_000, d, |p, d| {
        let expect = if SUPPORTED_HEAD_DIMS.contains(&d) { Expect::Ok } else { invalid("head_dim") };
        p.call(expect, || check_head_dim(d))?;
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// LayerCache and stores (emulator store, counting launches).

/// Unsupported head_dims, including ones a kernel could almost serve.
pub(super) fn bad_head_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![0, 1, 8, 16, 32, 63, 65, 96, 100, 127, 129, 192, 255, 257, 512, 1024]),
        (0usize..4096).prop_filter("unsupported", |d| !SUPPORTED_HEAD_DIMS.contains(d)),
        Just(usize::MAX),
    ]
}

/// A small valid layout for caches (the first segment Full and full, so appends can fail).
pub(super) fn cache_layout() -> impl Strategy<Value = LayerLayout> {
    (table(), 0u32..4).prop_map(|(t, x)| {
        let mut segs = t.segs;
        segs[0].len = segs[0].capacity;
        segs[0].ring_head = match segs[0].mode {
            SegmentMode::Streaming { window, .. } => x % window,
            SegmentMode::Full => 0,
        };
        LayerLayout::new(t.batch, t.kv_heads, t.total_rows, segs).unwrap()
    })
}

pub(super) fn elems(layout: &LayerLayout, d: usize) -> usize {
    layout.total_rows() * d
}

pub(super) fn cache_new(b: &mut Battery) {
    b.run("LayerCache::new", 1_000, (cache_layout(), bad_head_dim()), |p, (layout, d)| {
        let s = store(p);
        p.call(invalid("head_dim"), || LayerCache::<_, bf16>::new(&s, layout.clone(), d))?;
        let d = SUPPORTED_HEAD_DIMS[layout.total_rows() % 3];
        if let Some(c) = p.call(Expect::Ok, || LayerCache::<_, bf16>::new(&s, layout.clone(), d))? {
            check(c.layout() == &layout && Counting::len(c.k()) == elems(&layout, d), || {
                "wrong cache".into()
            })?;
        }
        Ok(())
    });
}

/// Wrong lengths for a buffer of `want` elements: off by a little, empty, sized for another
/// head_dim.
pub(super) fn wrong_len(want: usize, rows: usize, x: u32) -> usize {
    let d = SUPPORTED_HEAD_DIMS[x as usize % 3];
    let candidates = [want + 1, want.saturating_sub(1), 0, want * 2 + 8, rows * d + 8, want + 64];
    let n = candidates[(x / 3) as usize % candidates.len()];
    if n == want { want + 1 } else { n }
}

pub(super) fn cache_from_parts(b: &mut Battery) {
    let which = prop_oneof![Just("head_dim"), Just("k"), Just("v")];
    b.run(
        "LayerCache::from_parts",
        1_500,
        (cache_layout(), which, any::<u32>(), bad_head_dim()),
        |p, (layout, which, x, bad_d)| {
            let s = store(p);
            let d = 64;
            let want = elems(&layout, d);
            let (d, k_len, v_len) = match which {
                "head_dim" => (bad_d, want, want),
                "k" => (d, wrong_len(want, layout.total_rows(), x), want),
                _ => (d, want, wrong_len(want, layout.total_rows(), x)),
            };
            let (k, v) = (s.zeros::<bf16>(k_len).unwrap(), s.zeros::<bf16>(v_len).unwrap());
            p.call(invalid(which), || LayerCache::from_parts(&s, layout.clone(), d, k, v))?;
            Ok(())
        },
    );
}

pub(super) fn cache_append(b: &mut Battery) {
    let which = prop_oneof![Just("k_new"), Just("v_new"), Just("full"), Just("head_dim")];
    b.run("LayerCache::append", 1_500, (cache_layout(), which, any::<u32>()), |p, (layout, which, x)| {
        let s = store(p);
        let d = 64;
        let n = layout.segments().len();
        let mut cache = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
        let want = n * d;
        let (k_len, v_len, expect) = match which {
            "k_new" => (wrong_len(want, n, x), want, invalid("k_new")),
            "v_new" => (want, wrong_len(want, n, x), invalid("v_new")),
            // New tokens sized for head_dim 128 on a head_dim 64 cache.
            "head_dim" => (n * 128, n * 128, invalid("k_new")),
            _ => {
                let first_full = layout.segments().iter().position(|s| s.is_full());
                match first_full {
                    Some(i) => (want, want, Expect::SegmentFull(i)),
                    None => return Ok(()),
                }
            }
        };
        let (kn, vn) = (s.zeros::<bf16>(k_len).unwrap(), s.zeros::<bf16>(v_len).unwrap());
        p.call(expect, || cache.append(&kn, &vn))?;
        check(cache.layout() == &layout, || "a failed append changed the layout".into())?;
        Ok(())
    });
    b.controls("LayerCache::append", |p| {
        // Controls: a valid append launches once and advances every segment.
        let s = store(p);
        let layout =
            LayoutBuilder::new(2, 2).full(0, 0, 1).streaming(1, 1, 1, 2).headroom(2).build().unwrap();
        let mut cache = LayerCache::<_, bf16>::new(&s, layout, 64).unwrap();
        let t = s.upload(&vec![bf16::ONE; 4 * 64]).unwrap();
        let before = p.launches.get();
        p.call(Expect::Ok, || cache.append(&t, &t))?;
        check(p.launches.get() == before + 1, || "a valid append did not launch exactly once".into())?;
        let lens: Vec<u32> = cache.layout().segments().iter().map(|s| s.len).collect();
        check(lens == [2, 1, 1, 1], || format!("lens {lens:?}"))
    });
}

pub(super) fn cache_regrow(b: &mut Battery) {
    let headroom = prop_oneof![(0u32..1 << 20).prop_map(|x| u32::MAX - x), (MAX_ROWS as u32)..=u32::MAX];
    b.run("LayerCache::regrow", 1_000, (cache_layout(), headroom), |p, (layout, headroom)| {
        let s = store(p);
        let mut cache = LayerCache::<_, bf16>::new(&s, layout.clone(), 64).unwrap();
        // Every table here has a Full segment or rows enough that MAX_ROWS more overflow.
        let has_full = layout.segments().iter().any(|s| s.mode == SegmentMode::Full);
        if !has_full {
            return Ok(());
        }
        p.call(invalid("headroom"), || cache.regrow(headroom))?;
        check(cache.layout() == &layout, || "a failed regrow changed the layout".into())
    });
    b.controls("LayerCache::regrow", |p| {
        let s = store(p);
        let layout = LayoutBuilder::new(1, 2).full(0, 0, 3).streaming(0, 1, 1, 2).build().unwrap();
        let mut cache = LayerCache::<_, bf16>::new(&s, layout, 64).unwrap();
        p.call(Expect::Ok, || cache.regrow(5))?;
        check(cache.layout().segments()[0].capacity == 8, || format!("{:?}", cache.layout()))
    });
}

pub(super) fn cache_relayout_into(b: &mut Battery) {
    let which = prop_oneof![Just("target"), Just("segment"), Just("k_dst"), Just("v_dst")];
    b.run(
        "LayerCache::relayout_into",
        1_500,
        (cache_layout(), which, any::<u32>()),
        |p, (layout, which, x)| {
            let s = store(p);
            let d = 64;
            let cache = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
            let mut target = layout.regrown(1 + x % 3).unwrap();
            let want = elems(&target, d);
            let (mut k_len, mut v_len) = (want, want);
            let expect = match which {
                "target" => {
                    // Same segments, other grid: (batch, kv_heads) swapped or flattened.
                    let (bt, kv) = (layout.batch(), layout.kv_heads());
                    let (nb, nk) = if bt != kv { (kv, bt) } else { (1, bt * kv) };
                    if (nb, nk) == (bt, kv) {
                        return Ok(());
                    }
                    let segs = target.segments().to_vec();
                    target = LayerLayout::new(nb, nk, target.total_rows() as u64, segs).unwrap();
                    invalid("target")
                }
                "segment" => {
                    // One Full segment holding one more token than the cache's.
                    let Some(i) = target
                        .segments()
                        .iter()
                        .position(|s| s.mode == SegmentMode::Full && s.len < s.capacity)
                    else {
                        return Ok(());
                    };
                    let mut segs = target.segments().to_vec();
                    segs[i].len += 1;
                    target =
                        LayerLayout::new(target.batch(), target.kv_heads(), target.total_rows() as u64, segs)
                            .unwrap();
                    invalid(format!("target.segments[{i}]"))
                }
                "k_dst" => {
                    k_len = wrong_len(want, target.total_rows(), x);
                    invalid("k_dst")
                }
                _ => {
                    v_len = wrong_len(want, target.total_rows(), x);
                    invalid("v_dst")
                }
            };
            let (mut k, mut v) = (s.zeros::<bf16>(k_len).unwrap(), s.zeros::<bf16>(v_len).unwrap());
            p.call(expect, || cache.relayout_into(&target, &mut k, &mut v))?;
            Ok(())
        },
    );
}

#[derive(Clone, Debug)]
pub(super) enum AttentionFault {
    GroupSize(usize),
    Q(u32),
    Out(u32),
    Lse(u32),
    Scale(f32),
    ChunkTokens(u32),
    QForOtherHeadDim,
}

/// One fault in the arguments every attention entry point takes (`attention`,
/// `attention_with_mass`, `attention_chunk`).
pub(super) fn attention_fault() -> impl Strategy<Value = AttentionFault> {
    prop_oneof![
        prop_oneof![Just(0usize), MAX_GROUP + 1..200, Just(usize::MAX)].prop_map(AttentionFault::GroupSize),
        any::<u32>().prop_map(AttentionFault::Q),
        any::<u32>().prop_map(AttentionFault::Out),
        any::<u32>().prop_map(AttentionFault::Lse),
        prop::sample::select(vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::MAX,
            -f32::MAX,
            f32::MAX / 1.2
        ])
        .prop_map(AttentionFault::Scale),
        prop_oneof![Just(0u32), (i32::MAX as u32 + 1)..=u32::MAX].prop_map(AttentionFault::ChunkTokens),
        Just(AttentionFault::QForOtherHeadDim),
    ]
}

/// The arguments of one attention call over `rows` query rows of head_dim `d` (group size
/// `group`, an LSE buffer when `with_lse`), before a fault is applied.
pub(super) struct AttentionArgs {
    pub(super) q: usize,
    pub(super) out: usize,
    pub(super) lse: Option<usize>,
    pub(super) group: usize,
    pub(super) opts: AttentionOptions,
}

impl AttentionArgs {
    pub(super) fn new(rows: usize, d: usize, group: usize, with_lse: bool) -> AttentionArgs {
        AttentionArgs {
            q: rows * d,
            out: rows * d,
            lse: with_lse.then_some(rows),
            group,
            opts: AttentionOptions::default(),
        }
    }

    /// Applies `fault`; returns the field the call must name.
    pub(super) fn apply(&mut self, fault: &AttentionFault, rows: usize) -> &'static str {
        match *fault {
            AttentionFault::GroupSize(bad) => {
                self.group = bad;
                "group_size"
            }
            AttentionFault::Q(x) => {
                self.q = wrong_len(self.q, rows, x);
                "q"
            }
            AttentionFault::Out(x) => {
                self.out = wrong_len(self.out, rows, x);
                "out"
            }
            AttentionFault::Lse(x) => {
                self.lse = Some(wrong_len(rows, 1, x));
                "lse"
            }
            AttentionFault::Scale(x) => {
                self.opts.scale = Some(x);
                "scale"
            }
            AttentionFault::ChunkTokens(c) => {
                self.opts.chunk_tokens = Some(c);
                "chunk_tokens"
            }
            AttentionFault::QForOtherHeadDim => {
                self.q = rows * 128;
                "q"
            }
        }
    }
}

pub(super) fn cache_attention(b: &mut Battery) {
    b.run(
        "LayerCache::attention",
        2_500,
        (cache_layout(), 1usize..=MAX_GROUP, attention_fault()),
        |p, (layout, g, fault)| {
            let s = store(p);
            let d = 64;
            let cache = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
            let heads = layout.segments().len() * g;
            let mut a = AttentionArgs::new(heads, d, g, true);
            let expect = invalid(a.apply(&fault, heads));
            let (group, opts) = (a.group, a.opts);
            let q = s.zeros::<bf16>(a.q).unwrap();
            let mut out = s.zeros::<bf16>(a.out).unwrap();
            let mut lse = a.lse.map(|n| s.zeros::<f32>(n).unwrap());
            let mut ws = AttentionWorkspace::new();
            p.call(expect, || cache.attention(&q, group, &mut out, lse.as_mut(), &mut ws, &opts))?;
            Ok(())
        },
    );
    // More chunks than the grid's y dimension holds: a long segment split into 1-token chunks.
    let s = Counting(b.launches.clone());
    let long = 3 * MAX_SPLITS + 1;
    let layout = LayoutBuilder::new(1, 1).full(0, 0, long).build().unwrap();
    let cache = LayerCache::<_, bf16>::new(&s, layout, 64).unwrap();
    let q = s.zeros::<bf16>(64).unwrap();
    b.run("LayerCache::attention", 200, 1u32..=(long - 1) / MAX_SPLITS, |p, chunk| {
        let mut out = s.zeros::<bf16>(64).unwrap();
        let opts = AttentionOptions { chunk_tokens: Some(chunk), scale: None };
        let mut ws = AttentionWorkspace::new();
        p.call(invalid("chunk_tokens"), || cache.attention(&q, 1, &mut out, None, &mut ws, &opts))?;
        Ok(())
    });
    b.controls("LayerCache::attention", |p| {
        // Controls: valid calls launch (split: attention + merge) and write every output.
        let s = store(p);
        let layout = LayoutBuilder::new(1, 2).full(0, 0, 5).streaming(0, 1, 1, 2).build().unwrap();
        let cache = LayerCache::<_, bf16>::new(&s, layout, 64).unwrap();
        let q = s.upload(&vec![bf16::ONE; 2 * 2 * 64]).unwrap();
        let mut ws = AttentionWorkspace::new();
        for (chunk, launches) in [(None, 1), (Some(2), 2)] {
            let mut out = s.upload(&vec![bf16::NAN; 2 * 2 * 64]).unwrap();
            let mut lse = s.zeros::<f32>(4).unwrap();
            let opts = AttentionOptions { chunk_tokens: chunk, scale: None };
            let before = p.launches.get();
            p.call(Expect::Ok, || cache.attention(&q, 2, &mut out, Some(&mut lse), &mut ws, &opts))?;
            check(p.launches.get() == before + launches, || format!("{chunk:?}: not {launches} launch(es)"))?;
            let out = s.download(&out).unwrap();
            check(out.iter().all(|x| !x.is_nan()), || "an output was left unwritten".into())?;
        }
        Ok(())
    });
}

/// `attention_with_mass`: every fault of `attention` (the same checks run first) plus a mass
/// buffer of the wrong length.
pub(super) fn cache_attention_with_mass(b: &mut Battery) {
    // Mostly a fault of attention's arguments (the same checks run first), else a mass buffer
    // of the wrong length.
    let fault = prop_oneof![7 => attention_fault().prop_map(Some), 1 => Just(None)];
    b.run(
        "LayerCache::attention_with_mass",
        2_500,
        (cache_layout(), 1usize..=MAX_GROUP, fault, any::<u32>(), any::<bool>()),
        |p, (layout, g, fault, x, with_lse)| {
            let s = store(p);
            let d = 64;
            let cache = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
            let heads = layout.segments().len() * g;
            let rows = layout.total_rows();
            let mut a = AttentionArgs::new(heads, d, g, with_lse);
            let mut mass_len = rows;
            let expect = match &fault {
                Some(f) => invalid(a.apply(f, heads)),
                None => {
                    mass_len = wrong_len(rows, 1, x);
                    invalid("mass")
                }
            };
            let (group, opts) = (a.group, a.opts);
            let (q_len, out_len, lse_len) = (a.q, a.out, a.lse);
            let q = s.zeros::<bf16>(q_len).unwrap();
            let mut out = s.zeros::<bf16>(out_len).unwrap();
            let mut lse = lse_len.map(|n| s.zeros::<f32>(n).unwrap());
            let mut mass = s.zeros::<f32>(mass_len).unwrap();
            let mut ws = AttentionWorkspace::new();
            p.call(expect, || {
                cache.attention_with_mass(&q, group, &mut out, lse.as_mut(), &mut ws, &opts, &mut mass)
            })?;
            Ok(())
        },
    );
    b.controls("LayerCache::attention_with_mass", |p| {
        // Controls: attention (+ merge when split) + the mass kernel; the tokens' mass grows by
        // their group's probabilities (G = 2 in all per non-empty segment), free rows untouched.
        let s = store(p);
        let layout =
            LayoutBuilder::new(1, 2).full(0, 0, 5).streaming(0, 1, 1, 2).headroom(1).build().unwrap();
        let cache = LayerCache::<_, bf16>::new(&s, layout.clone(), 64).unwrap();
        let q = s.upload(&vec![bf16::ONE; 2 * 2 * 64]).unwrap();
        let mut ws = AttentionWorkspace::new();
        for (chunk, with_lse, launches) in [(None, false, 2), (Some(2), true, 3)] {
            let mut out = s.zeros::<bf16>(2 * 2 * 64).unwrap();
            let mut lse = s.zeros::<f32>(4).unwrap();
            let mut mass = s.upload(&vec![1.0f32; layout.total_rows()]).unwrap();
            let opts = AttentionOptions { chunk_tokens: chunk, scale: None };
            let before = p.launches.get();
            p.call(Expect::Ok, || {
                cache.attention_with_mass(
                    &q,
                    2,
                    &mut out,
                    with_lse.then_some(&mut lse),
                    &mut ws,
                    &opts,
                    &mut mass,
                )
            })?;
            check(p.launches.get() == before + launches, || format!("{chunk:?}: not {launches} launch(es)"))?;
            let m = s.download(&mass).unwrap();
            for (i, seg) in layout.segments().iter().enumerate() {
                let added: f32 = (0..seg.len).map(|t| m[seg.row(t) as usize] - 1.0).sum();
                let want = if seg.len == 0 { 0.0 } else { 2.0 };
                check((added - want).abs() < 1e-5, || {
                    format!("segment {i}: mass grew by {added}, not {want}")
                })?;
            }
            let last = layout.segments()[0].offset as usize + 5; // segment 0's free row
            check(m[last] == 1.0, || "a free row's mass changed".into())?;
        }
        Ok(())
    });
}

pub(super) fn emu_store(b: &mut Battery) {
    b.run("EmuStore", 1_000, (0usize..64, any::<u32>()), |p, (n, x)| {
        let mut buf = EmuStore.zeros::<bf16>(n).unwrap();
        let data = vec![bf16::ONE; wrong_len(n, 1, x)];
        p.call(invalid("data"), || EmuStore.overwrite(&mut buf, &data))?;
        // Sizes whose bytes overflow the address space.
        let huge = usize::MAX / 2 - (x as usize % 16);
        p.call(invalid("len"), || EmuStore.zeros::<bf16>(huge))?;
        Ok(())
    });
}

#[cfg(feature = "cuda")]
pub(super) fn gpu_store_new(b: &mut Battery) {
    // No machine has this many devices: NoGpu on a GPU machine, NoGpu or NoKernels elsewhere.
    b.run("GpuStore::new", 20, prop_oneof![1usize << 20..usize::MAX, Just(usize::MAX)], |p, ordinal| {
        p.call(Expect::NoDevice, || GpuStore::new(ordinal))?;
        Ok(())
    });
}
