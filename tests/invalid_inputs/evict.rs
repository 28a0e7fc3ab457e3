//! Decode-time evictions: R-KV (`redundancy::evict`, the query ring) and H2O
//! (`heavy_hitters::evict_by_mass`), on the launch-counting store. Part of
//! tests/invalid_inputs.rs.

use super::*;

/// A layer for R-KV: segment 0 is `Full` with more tokens than any budget drawn here, the others
/// `Full` (some past the budget) or `Streaming`.
pub(super) fn rkv_layout() -> impl Strategy<Value = LayerLayout> {
    let slot = (any::<bool>(), 0u32..=12, 0u32..3, 1u32..4);
    (1usize..=2, prop::collection::vec(slot, 1..=6), 0u32..3).prop_map(|(batch, slots, headroom)| {
        let kv_heads = slots.len().div_ceil(batch);
        let mut lb = LayoutBuilder::new(batch, kv_heads).headroom(headroom);
        for i in 0..batch * kv_heads {
            let (streaming, len, sink, window) = slots[i % slots.len()];
            let (b, h) = (i / kv_heads, i % kv_heads);
            lb = if i == 0 {
                lb.full(b, h, 8 + len)
            } else if streaming {
                lb.streaming(b, h, sink, window)
            } else {
                lb.full(b, h, len)
            };
        }
        lb.build().unwrap()
    })
}

#[derive(Clone, Debug)]
pub(super) enum RkvFault {
    /// A valid call that compacts nothing (no launch).
    None,
    AlphaZero,
    AlphaAboveMax(usize),
    BudgetAtMostAlpha(u32),
    BudgetAboveInt32(usize),
    KernelEven(usize),
    KernelAboveInt32(usize),
    Lambda(f64),
    GroupSize(usize),
    RingHeads(u32),
    RingAlpha(u32),
    RingHeadDim,
    MaskLen(u32),
    MaskStreaming(usize, u32),
    EmptyRing(bool),
}

pub(super) fn rkv_evict(b: &mut Battery) {
    let fault = prop_oneof![
        Just(RkvFault::None),
        Just(RkvFault::AlphaZero),
        prop_oneof![MAX_ALPHA + 1..1000, Just(usize::MAX / 2)].prop_map(RkvFault::AlphaAboveMax),
        any::<u32>().prop_map(RkvFault::BudgetAtMostAlpha),
        prop_oneof![i32::MAX as usize + 1..usize::MAX, Just(usize::MAX)].prop_map(RkvFault::BudgetAboveInt32),
        prop_oneof![(0usize..50).prop_map(|k| 2 * k), Just(usize::MAX - 1)].prop_map(RkvFault::KernelEven),
        prop_oneof![(i32::MAX as usize / 2 + 1..usize::MAX / 2).prop_map(|k| 2 * k + 1), Just(usize::MAX)]
            .prop_map(RkvFault::KernelAboveInt32),
        prop_oneof![
            prop::sample::select(vec![
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                -f64::MIN_POSITIVE,
                1.0 + f64::EPSILON
            ]),
            -1e300f64..-1e-300,
            1.0000001f64..1e300,
        ]
        .prop_map(RkvFault::Lambda),
        prop_oneof![Just(0usize), MAX_RKV_GROUP + 1..200, Just(usize::MAX)].prop_map(RkvFault::GroupSize),
        any::<u32>().prop_map(RkvFault::RingHeads),
        any::<u32>().prop_map(RkvFault::RingAlpha),
        Just(RkvFault::RingHeadDim),
        any::<u32>().prop_map(RkvFault::MaskLen),
        (0usize..12, any::<u32>()).prop_map(|(i, x)| RkvFault::MaskStreaming(i, x)),
        any::<bool>().prop_map(RkvFault::EmptyRing),
    ];
    let opts = (1usize..=4, 1usize..=3, 0usize..4, 0usize..6, 0.0f64..=1.0, any::<bool>());
    b.run(
        "redundancy::evict",
        6_000,
        (rkv_layout(), 1usize..=4, opts, any::<u32>(), fault),
        |p, (layout, g, (alpha, extra, kernel, buffer, lambda, quirk), x, fault)| {
            let s = store(p);
            let d = 64;
            let n = layout.segments().len();
            let mut opts = RkvOptions {
                budget: alpha + extra,
                buffer,
                alpha,
                kernel: 2 * kernel + 1,
                lambda,
                fidelity_quirk: quirk,
            };
            let mut group = g;
            let (mut heads, mut ring_alpha, mut ring_d) = (n * g, alpha, d);
            let full: Vec<bool> = layout.segments().iter().map(|s| s.mode == SegmentMode::Full).collect();
            // Valid: a mask over Full segments none of which holds more than the budget, or
            // a threshold no segment reaches.
            let quiet: Vec<bool> = layout
                .segments()
                .iter()
                .map(|s| s.mode == SegmentMode::Full && s.len as usize <= opts.budget)
                .collect();
            let mut mask = Some(quiet);
            let expect = match fault {
                RkvFault::None => {
                    if x % 2 == 0 {
                        (mask, opts.buffer) = (None, 100);
                    }
                    Expect::Ok
                }
                RkvFault::AlphaZero => {
                    opts.alpha = 0;
                    invalid("alpha")
                }
                RkvFault::AlphaAboveMax(a) => {
                    (opts.alpha, opts.budget) = (a, a + 1);
                    invalid("alpha")
                }
                RkvFault::BudgetAtMostAlpha(y) => {
                    opts.budget = y as usize % (alpha + 1);
                    invalid("budget")
                }
                RkvFault::BudgetAboveInt32(v) => {
                    opts.budget = v;
                    invalid("budget")
                }
                RkvFault::KernelEven(k) => {
                    opts.kernel = k;
                    invalid("kernel")
                }
                RkvFault::KernelAboveInt32(k) => {
                    opts.kernel = k;
                    invalid("kernel")
                }
                RkvFault::Lambda(l) => {
                    opts.lambda = l;
                    invalid("lambda")
                }
                RkvFault::GroupSize(v) => {
                    group = v;
                    invalid("group_size")
                }
                RkvFault::RingHeads(y) => {
                    // Sized for another group or segment count.
                    heads = match y % 3 {
                        0 => n * g + 1,
                        1 if n * g > 1 => n * g - 1,
                        _ => n * (g % 4 + 1) + n * 4,
                    };
                    invalid("ring")
                }
                RkvFault::RingAlpha(y) => {
                    ring_alpha = 1 + (alpha + y as usize % (MAX_ALPHA - 1)) % MAX_ALPHA;
                    invalid("ring")
                }
                RkvFault::RingHeadDim => {
                    ring_d = SUPPORTED_HEAD_DIMS[1 + x as usize % 2];
                    invalid("ring")
                }
                RkvFault::MaskLen(y) => {
                    let len = [n + 1, n - 1, 0, n * 2, n + 1 + y as usize % 100][y as usize % 5];
                    mask = Some(vec![false; len]);
                    invalid("trigger")
                }
                RkvFault::MaskStreaming(i, y) => {
                    match pick(layout.segments(), i, |s| s.mode != SegmentMode::Full) {
                        Some(k) => {
                            // Also any Full segments (which would be compacted): the Streaming one
                            // is refused first.
                            let mut m: Vec<bool> =
                                full.iter().enumerate().map(|(j, &f)| f && (y >> j) & 1 == 1).collect();
                            m[k] = true;
                            mask = Some(m);
                            invalid(format!("trigger[{k}]"))
                        }
                        None => {
                            mask = Some(vec![true; n + 1]);
                            invalid("trigger")
                        }
                    }
                }
                RkvFault::EmptyRing(threshold) => {
                    // Segment 0 holds more than the budget; no query was pushed.
                    if threshold {
                        (mask, opts.buffer) = (None, layout.segments()[0].len as usize - opts.budget);
                    } else {
                        mask.as_mut().unwrap()[0] = true;
                    }
                    invalid("ring")
                }
            };
            let mut cache = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
            let ring = QueryRing::<_, bf16>::new(&s, heads, ring_alpha, ring_d).unwrap();
            let trigger = match &mask {
                Some(m) => RkvTrigger::Forced(m),
                None => RkvTrigger::Threshold,
            };
            let mut ws = RkvWorkspace::new();
            if let Some(done) = p.call(expect, || evict(&mut cache, &ring, group, &opts, trigger, &mut ws))? {
                check(done == vec![false; n], || {
                    format!("compacted {done:?} with no segment past the budget")
                })?;
            }
            check(cache.layout() == &layout, || {
                "an eviction that compacted nothing changed the layout".into()
            })
        },
    );
    b.controls("redundancy::evict", |p| {
        // Control: a segment past the budget, with queries pushed, is compacted (4 launches) to
        // the budget; the Streaming one is left alone.
        let s = store(p);
        let layout = LayoutBuilder::new(1, 2).full(0, 0, 24).streaming(0, 1, 2, 4).build().unwrap();
        let d = 64;
        let rows: Vec<bf16> =
            (0..layout.total_rows() * d).map(|i| bf16::from_f32((i % 17) as f32 / 9.0)).collect();
        let (k, v) = (s.upload(&rows).unwrap(), s.upload(&rows).unwrap());
        let mut cache = LayerCache::from_parts(&s, layout, d, k, v).unwrap();
        let mut ring = QueryRing::<_, bf16>::new(&s, 2 * 2, 4, d).unwrap();
        let q = s.upload(&rows[..4 * d]).unwrap();
        p.call(Expect::Ok, || ring.push(&q))?;
        let opts = RkvOptions { alpha: 4, ..RkvOptions::new(10) };
        let before = p.launches.get();
        let mut ws = RkvWorkspace::new();
        let done = p.call(Expect::Ok, || {
            evict(&mut cache, &ring, 2, &opts, RkvTrigger::Forced(&[true, false]), &mut ws)
        })?;
        check(done == Some(vec![true, false]), || format!("compacted {done:?}"))?;
        check(p.launches.get() == before + 4, || "a compaction did not launch 4 kernels".into())?;
        check(cache.layout().segments()[0].len == 10, || format!("{:?}", cache.layout()))
    });
}

#[derive(Clone, Debug)]
pub(super) enum H2oFault {
    /// Valid: a budget no Full segment exceeds (no launch).
    None,
    BudgetZero,
    BudgetAboveInt32(usize),
    RecentAboveBudget(u32),
    Mass(u32),
}

pub(super) fn h2o_evict_by_mass(b: &mut Battery) {
    let fault = prop_oneof![
        Just(H2oFault::None),
        Just(H2oFault::BudgetZero),
        prop_oneof![i32::MAX as usize + 1..usize::MAX, Just(usize::MAX)].prop_map(H2oFault::BudgetAboveInt32),
        any::<u32>().prop_map(H2oFault::RecentAboveBudget),
        any::<u32>().prop_map(H2oFault::Mass),
    ];
    b.run(
        "heavy_hitters::evict_by_mass",
        4_000,
        (rkv_layout(), 1usize..=12, 0usize..=12, fault),
        |p, (layout, budget, r, fault)| {
            let s = store(p);
            let rows = layout.total_rows();
            let mut opts = H2oOptions { budget, recent: r % (budget + 1) };
            let mut mass_len = rows;
            let expect = match fault {
                H2oFault::None => {
                    opts.budget = layout.segments().iter().map(|s| s.len as usize).max().unwrap_or(0).max(1);
                    opts.recent = opts.recent.min(opts.budget);
                    Expect::Ok
                }
                H2oFault::BudgetZero => {
                    opts.budget = 0;
                    invalid("budget")
                }
                H2oFault::BudgetAboveInt32(v) => {
                    opts.budget = v;
                    invalid("budget")
                }
                H2oFault::RecentAboveBudget(x) => {
                    opts.recent = budget + 1 + x as usize % 1000;
                    invalid("recent")
                }
                H2oFault::Mass(x) => {
                    mass_len = wrong_len(rows, 1, x);
                    invalid("mass")
                }
            };
            let mut cache = LayerCache::<_, bf16>::new(&s, layout.clone(), 64).unwrap();
            let mut mass = s.zeros::<f32>(mass_len).unwrap();
            let mut ws = H2oWorkspace::new();
            if let Some(done) = p.call(expect, || evict_by_mass(&mut cache, &mut mass, &opts, &mut ws))? {
                check(done == vec![false; layout.segments().len()], || format!("compacted {done:?}"))?;
            }
            check(cache.layout() == &layout, || {
                "an eviction that compacted nothing changed the layout".into()
            })
        },
    );
    b.controls("heavy_hitters::evict_by_mass", |p| {
        // Control: the Full segment past the budget is compacted in one launch; the Streaming
        // one is left alone.
        let s = store(p);
        let layout = LayoutBuilder::new(1, 2).full(0, 0, 24).streaming(0, 1, 2, 4).build().unwrap();
        let rows = layout.total_rows();
        let mut cache = LayerCache::<_, bf16>::new(&s, layout, 64).unwrap();
        let mut mass = s.upload(&(0..rows).map(|i| (i % 7) as f32).collect::<Vec<_>>()).unwrap();
        let mut ws = H2oWorkspace::new();
        let before = p.launches.get();
        let opts = H2oOptions { budget: 10, recent: 3 };
        let done = p.call(Expect::Ok, || evict_by_mass(&mut cache, &mut mass, &opts, &mut ws))?;
        check(done == Some(vec![true, false]), || format!("compacted {done:?}"))?;
        check(p.launches.get() == before + 1, || "a compaction did not launch once".into())?;
        check(cache.layout().segments()[0].len == 10, || format!("{:?}", cache.layout()))
    });
}

pub(super) fn query_ring_new(b: &mut Battery) {
    let fault = prop_oneof![
        Just(None),
        bad_head_dim().prop_map(|d| Some(("head_dim", d))),
        prop_oneof![Just(0usize), i32::MAX as usize + 1..usize::MAX, Just(usize::MAX)]
            .prop_map(|h| Some(("heads", h))),
        prop_oneof![Just(0usize), MAX_ALPHA + 1..1000, Just(usize::MAX)].prop_map(|a| Some(("alpha", a))),
    ];
    let d = prop::sample::select(SUPPORTED_HEAD_DIMS.to_vec());
    b.run(
        "QueryRing::new",
        4_000,
        (1usize..=64, 1usize..=MAX_ALPHA, d, fault),
        |p, (heads, alpha, d, fault)| {
            let s = store(p);
            let (mut heads, mut alpha, mut d) = (heads, alpha, d);
            let expect = match fault {
                None => Expect::Ok,
                Some((field, v)) => {
                    match field {
                        "head_dim" => d = v,
                        "heads" => heads = v,
                        _ => alpha = v,
                    }
                    invalid(field)
                }
            };
            if let Some(r) = p.call(expect, || QueryRing::<_, bf16>::new(&s, heads, alpha, d))? {
                check(
                    r.heads() == heads
                        && r.alpha() == alpha
                        && r.count() == 0
                        && Counting::len(r.buf()) == heads * alpha * d,
                    || "wrong ring".into(),
                )?;
            }
            Ok(())
        },
    );
}

pub(super) fn query_ring_push(b: &mut Battery) {
    let d = prop::sample::select(SUPPORTED_HEAD_DIMS.to_vec());
    b.run(
        "QueryRing::push",
        3_000,
        (1usize..=16, 1usize..=MAX_ALPHA, d, any::<u32>()),
        |p, (heads, alpha, d, x)| {
            let s = store(p);
            let mut ring = QueryRing::<_, bf16>::new(&s, heads, alpha, d).unwrap();
            let q = s.zeros::<bf16>(wrong_len(heads * d, heads, x)).unwrap();
            p.call(invalid("q"), || ring.push(&q))?;
            check(ring.count() == 0 && ring.next_slot() == 0, || "a refused push moved the ring".into())
        },
    );
    b.controls("QueryRing::push", |p| {
        // Control: valid pushes launch once each and wrap around the ring.
        let s = store(p);
        let mut ring = QueryRing::<_, bf16>::new(&s, 3, 2, 64).unwrap();
        let q = s.upload(&vec![bf16::ONE; 3 * 64]).unwrap();
        for i in 0..3 {
            let before = p.launches.get();
            p.call(Expect::Ok, || ring.push(&q))?;
            check(p.launches.get() == before + 1, || format!("push {i} did not launch once"))?;
        }
        check(ring.count() == 2 && ring.next_slot() == 1, || "wrong ring position".into())
    });
}
