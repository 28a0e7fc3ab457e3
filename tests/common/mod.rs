//! Shared test scenarios, generic over the store so the emulator and the GPU run the same checks.
#![allow(dead_code)]

use headwise::layout::{LayerLayout, Segment, SegmentMode};
use headwise::{Error, KvElem, LayerCache, Store, reference};
use proptest::prelude::*;

#[cfg(feature = "capi")]
pub mod capi_loop;
pub mod chunk;
pub mod h2o;
pub mod packed;
pub mod select;

/// One segment of a random layout: its mode and initial length (Full) plus headroom.
#[derive(Clone, Debug)]
pub enum SegSpec {
    Full { len: u32, headroom: u32 },
    Streaming { sink: u32, window: u32 },
}

pub fn seg_spec() -> impl Strategy<Value = SegSpec> {
    prop_oneof![
        (0u32..5, 0u32..6).prop_map(|(len, headroom)| SegSpec::Full { len, headroom }),
        (0u32..4, 1u32..6).prop_map(|(sink, window)| SegSpec::Streaming { sink, window }),
    ]
}

/// A packed layout from specs, with `gaps[i]` unused rows before segment i (so offsets are not
/// simply cumulative).
pub fn build_layout(batch: usize, kv_heads: usize, specs: &[SegSpec], gaps: &[u32]) -> LayerLayout {
    let mut off = 0u32;
    let mut segs = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        off += gaps.get(i).copied().unwrap_or(0);
        let seg = match *s {
            SegSpec::Full { len, headroom } => Segment::full(off, len + headroom, len),
            SegSpec::Streaming { sink, window } => Segment::streaming(off, sink, window),
        };
        off += seg.capacity;
        segs.push(seg);
    }
    LayerLayout::new(batch, kv_heads, u64::from(off) + 1, segs).unwrap()
}

/// Deterministic "random" bits for element buffers (xorshift), including NaN/Inf patterns.
pub fn bits<T: KvElem>(seed: u64, n: usize) -> Vec<T> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytemuck::cast::<u16, T>(x as u16)
        })
        .collect()
}

fn raw<T: KvElem>(v: &[T]) -> Vec<u16> {
    v.iter().map(|&e| bytemuck::cast::<T, u16>(e)).collect()
}

/// The logical contents a segment must hold after the appends in `history`: a Full segment all
/// of them, a Streaming one its first `sink` and its last `window` (an independent model of the
/// ring, not the row arithmetic under test).
fn expected_tokens(mode: SegmentMode, history: &[Vec<u16>]) -> Vec<Vec<u16>> {
    match mode {
        SegmentMode::Full => history.to_vec(),
        SegmentMode::Streaming { sink, window } => {
            let sink = (sink as usize).min(history.len());
            let rest = &history[sink..];
            let keep = rest.len().min(window as usize);
            history[..sink].iter().chain(&rest[rest.len() - keep..]).cloned().collect()
        }
    }
}

/// Appends `steps` random tokens through `store` and through the CPU reference, both starting
/// from the same poisoned buffers. After every step: identical layouts, the device table equal to
/// the host's, K and V byte-identical (every row, written or not), and each segment's tokens, read
/// in logical order, equal to the independent model. A full `Full` segment must make both sides
/// fail with SegmentFull; the test then regrows (with `regrow_headroom`) and carries on.
pub fn append_scenario<S: Store, T: KvElem>(
    store: &S,
    layout: LayerLayout,
    head_dim: usize,
    steps: usize,
    regrow_headroom: u32,
    seed: u64,
) {
    let rows = layout.total_rows();
    let poison_k = bits::<T>(seed ^ 1, rows * head_dim);
    let poison_v = bits::<T>(seed ^ 2, rows * head_dim);
    let mut ref_layout = layout.clone();
    let (mut ref_k, mut ref_v) = (poison_k.clone(), poison_v.clone());
    let mut cache = LayerCache::<S, T>::from_parts(
        store,
        layout.clone(),
        head_dim,
        store.upload(&poison_k).unwrap(),
        store.upload(&poison_v).unwrap(),
    )
    .unwrap();

    let n = layout.segments().len();
    // History per segment: the initial Full rows (poison), then every appended K row.
    let mut history: Vec<Vec<Vec<u16>>> = (0..n)
        .map(|s| {
            reference::token_rows(&layout, s)
                .iter()
                .map(|&r| raw(&poison_k[r as usize * head_dim..(r as usize + 1) * head_dim]))
                .collect()
        })
        .collect();

    for step in 0..steps {
        let k_new = bits::<T>(seed.wrapping_add(1000 + step as u64), n * head_dim);
        let v_new = bits::<T>(seed.wrapping_add(5000 + step as u64), n * head_dim);
        let (dk, dv) = (store.upload(&k_new).unwrap(), store.upload(&v_new).unwrap());
        let got = cache.append(&dk, &dv);
        let want = reference::append(&mut ref_layout, head_dim, &mut ref_k, &mut ref_v, &k_new, &v_new);
        match (got, want) {
            (Ok(()), Ok(())) => {
                for (s, h) in history.iter_mut().enumerate() {
                    h.push(raw(&k_new[s * head_dim..(s + 1) * head_dim]));
                }
            }
            (Err(Error::SegmentFull { segment: a, .. }), Err(Error::SegmentFull { segment: b, .. })) => {
                assert_eq!(a, b, "step {step}: both must name the same full segment");
                cache.regrow(regrow_headroom).unwrap();
                // The reference regrow: rows move to the new offsets, physical order kept.
                let target = ref_layout.regrown(regrow_headroom).unwrap();
                let mut k2 = vec![T::default(); target.total_rows() * head_dim];
                let mut v2 = k2.clone();
                for (a, b) in ref_layout.segments().iter().zip(target.segments()) {
                    let (src, dst) = (a.offset as usize * head_dim, b.offset as usize * head_dim);
                    let len = a.len as usize * head_dim;
                    k2[dst..dst + len].copy_from_slice(&ref_k[src..src + len]);
                    v2[dst..dst + len].copy_from_slice(&ref_v[src..src + len]);
                }
                // Rows beyond len are unspecified after a regrow: compare only what both wrote,
                // by taking the store's bytes for them.
                let got_k = store.download(cache.k()).unwrap();
                let got_v = store.download(cache.v()).unwrap();
                for b in target.segments() {
                    let (lo, hi) =
                        ((b.offset + b.len) as usize * head_dim, (b.offset + b.capacity) as usize * head_dim);
                    k2[lo..hi].copy_from_slice(&got_k[lo..hi]);
                    v2[lo..hi].copy_from_slice(&got_v[lo..hi]);
                }
                ref_layout = target;
                ref_k = k2;
                ref_v = v2;
            }
            (got, want) => panic!("step {step}: store gave {got:?}, reference gave {want:?}"),
        }
        assert_eq!(cache.layout(), &ref_layout, "step {step}: layouts differ");
        assert_eq!(
            store.download(cache.device_table()).unwrap(),
            ref_layout.device_table(),
            "step {step}: device table differs from the host layout"
        );
        let got_k = store.download(cache.k()).unwrap();
        let got_v = store.download(cache.v()).unwrap();
        assert!(raw(&got_k) == raw(&ref_k), "step {step}: K differs from the reference");
        assert!(raw(&got_v) == raw(&ref_v), "step {step}: V differs from the reference");
        for (s, (seg, hist)) in ref_layout.segments().iter().zip(&history).enumerate() {
            let logical: Vec<Vec<u16>> = reference::token_rows(&ref_layout, s)
                .iter()
                .map(|&r| raw(&got_k[r as usize * head_dim..(r as usize + 1) * head_dim]))
                .collect();
            assert_eq!(
                logical,
                expected_tokens(seg.mode, hist),
                "step {step}: segment {s} holds the wrong tokens"
            );
        }
    }
}

/// A segment of a random attention layout: Full with `len` tokens, or Streaming with a ring
/// either filling or full (and then rotated by `ring_head`).
#[derive(Clone, Debug)]
pub enum AttnSeg {
    Full { len: u32 },
    Streaming { sink: u32, window: u32, fill: u32, ring_head: u32 },
}

pub fn attn_seg(max_len: u32) -> impl Strategy<Value = AttnSeg> {
    prop_oneof![
        prop_oneof![Just(0u32), Just(1), 0..max_len].prop_map(|len| AttnSeg::Full { len }),
        (0u32..5, 1u32..40, 0u32..60, 0u32..40).prop_map(|(sink, window, fill, rh)| AttnSeg::Streaming {
            sink,
            window,
            fill,
            ring_head: rh % window
        }),
    ]
}

pub fn attn_layout(batch: usize, kv_heads: usize, segs: &[AttnSeg]) -> LayerLayout {
    let mut off = 0u32;
    let mut out = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        off += (i % 3) as u32; // gaps between segments
        let seg = match *s {
            AttnSeg::Full { len } => Segment::full(off, len + 2, len),
            AttnSeg::Streaming { sink, window, fill, ring_head } => {
                let mut g = Segment::streaming(off, sink, window);
                g.len = fill.min(g.capacity);
                g.ring_head = if g.len == g.capacity { ring_head } else { 0 };
                g
            }
        };
        off += seg.capacity;
        out.push(seg);
    }
    LayerLayout::new(batch, kv_heads, u64::from(off), out).unwrap()
}

/// Values in [-amp, amp] (a few rows get a larger spike so softmax is not flat).
pub fn values<T: KvElem>(seed: u64, n: usize, amp: f32) -> Vec<T> {
    let mut x = seed.wrapping_mul(0x2545F4914F6CDD1D) | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            let spike = if (x >> 8).is_multiple_of(97) { 4.0 } else { 1.0 };
            T::from_f32(u * amp * spike * if i % 7 == 0 { 1.5 } else { 1.0 })
        })
        .collect()
}

/// Runs decode attention through `store` and compares with the f64 reference: per query head, the
/// relative L2 error of the output below `tol` (SPEC section 7: 1e-3 for f16, 1e-2 for bf16),
/// LSE within 1e-3, empty segments exactly zero with LSE -inf. The chunk scenario with
/// `q_len = 1`, through [`LayerCache::attention`] (see [`chunk::chunk_scenario`]).
pub fn attention_scenario<S: Store, T: KvElem>(
    store: &S,
    layout: LayerLayout,
    head_dim: usize,
    group: usize,
    opts: headwise::AttentionOptions,
    with_lse: bool,
    seed: u64,
) {
    chunk::chunk_scenario::<S, T>(store, &layout, head_dim, group, 1, opts, with_lse, seed);
}

/// Budgets of a [`SelectCase`].
#[derive(Clone, Debug)]
pub enum CaseBudgets {
    PerRow(Vec<u32>),
    AdaKv { base: u32, floor_alpha: f32 },
}

/// One prefill-compression scenario (see [`select_scenario`]).
#[derive(Clone, Debug)]
pub struct SelectCase {
    pub batch: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub q: usize,
    pub head_dim: usize,
    pub opts: headwise::select::SelectOptions,
    pub budgets: CaseBudgets,
    pub seed: u64,
}

/// What a scenario saw, for tests that check more.
pub struct SelectOutcome<S: Store, T: KvElem> {
    pub kept: Vec<Vec<u32>>,
    pub device_scores: Vec<Vec<f32>>,
    pub reference_scores: Vec<Vec<f64>>,
    pub budgets: Vec<usize>,
    /// The compressed cache, for tests that go on to decode from it.
    pub cache: LayerCache<S, T>,
}

/// The host prompt of a [`SelectCase`]: `k`, `v` `[batch][kv_heads][q][head_dim]`, `queries`
/// `[batch][kv_heads * group][window][head_dim]`.
#[derive(Clone)]
pub struct SelectData<T> {
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub queries: Vec<T>,
}

/// Random prompt data for `case` (seeded by `case.seed`).
pub fn select_data<T: KvElem>(case: &SelectCase) -> SelectData<T> {
    let (d, q, g, w) = (case.head_dim, case.q, case.group, case.opts.window);
    let segs = case.batch * case.kv_heads;
    SelectData {
        k: values(case.seed, segs * q * d, 1.0),
        v: values(case.seed ^ 0xabc, segs * q * d, 1.0),
        queries: values(case.seed ^ 0x5eed, segs * g * w * d, 1.0),
    }
}

/// Scores within this much of each other (relative to the row's largest score) count as a
/// near tie (SPEC section 7): f16/bf16 inputs are exact in both, so what separates the device
/// from the f64 reference is f32 rounding of D-term dot products, exp2 and the W-term means.
pub const SCORE_TOL: f64 = 2e-5;

/// Compresses a random prompt through `store` and checks, stage by stage and end to end:
/// - device pooled scores against the f64 reference, within SCORE_TOL of the row maximum;
/// - AdaKV budgets equal to the reference allocation over the device's own scores (exact);
/// - kept positions equal to the reference selection over the device's own scores (exact:
///   the selection is deterministic and ties go to the lower position);
/// - kept positions against the reference selection over f64 scores, a difference excused
///   only for tokens whose reference score lies within the near-tie tolerance of the cut;
/// - window present, count == min(budget, q), ascending, and the cache rows byte-identical to
///   the prompt rows they came from (the new cache starts zeroed and prompt rows are random,
///   so a row the gather missed or misplaced shows).
pub fn select_scenario<S: Store, T: KvElem>(store: &S, case: &SelectCase) -> SelectOutcome<S, T> {
    select_scenario_on(store, case, &select_data(case))
}

/// [`select_scenario`] on given prompt data (planted ties, NaN, zeros).
pub fn select_scenario_on<S: Store, T: KvElem>(
    store: &S,
    case: &SelectCase,
    data: &SelectData<T>,
) -> SelectOutcome<S, T> {
    use headwise::select::{Budgets, GqaReduce, Granularity, Prompt, SelectWorkspace, compress};
    let (d, q, g, w) = (case.head_dim, case.q, case.group, case.opts.window);
    let segs = case.batch * case.kv_heads;
    let (k, v, queries) = (&data.k, &data.v, &data.queries);
    let (kb, vb, qb) = (store.upload(k).unwrap(), store.upload(v).unwrap(), store.upload(queries).unwrap());
    let prompt = Prompt {
        k: &kb,
        v: &vb,
        queries: &qb,
        batch: case.batch,
        kv_heads: case.kv_heads,
        group_size: g,
        q_len: q,
        head_dim: d,
        packing: Default::default(),
    };
    let budgets = match &case.budgets {
        CaseBudgets::PerRow(b) => Budgets::PerRow(b),
        CaseBudgets::AdaKv { base, floor_alpha } => Budgets::AdaKv { base: *base, floor_alpha: *floor_alpha },
    };
    let mut ws = SelectWorkspace::new();
    let cache = compress(store, &prompt, budgets, &case.opts, &mut ws).unwrap();
    let per_qh = case.opts.granularity == Granularity::QueryHead;
    let rows = if per_qh { segs * g } else { segs };
    let n = q - w;

    // Reference scores per row.
    let reference_scores: Vec<Vec<f64>> = (0..rows)
        .map(|r| {
            let (s, heads) = if per_qh { (r / g, r % g..r % g + 1) } else { (r, 0..g) };
            let ks = &k[s * q * d..(s + 1) * q * d];
            let qs = &queries[(s * g + heads.start) * w * d..(s * g + heads.end) * w * d];
            let gqa = if per_qh { GqaReduce::Mean } else { case.opts.gqa };
            reference::snapkv_scores(ks, qs, d, w, case.opts.pool_kernel, case.opts.pool, gqa)
        })
        .collect();
    let flat = ws.scores(store).unwrap();
    let device_scores: Vec<Vec<f32>> = (0..rows).map(|r| flat[r * n..(r + 1) * n].to_vec()).collect();
    for r in 0..rows {
        let top = reference_scores[r].iter().copied().fold(0.0f64, f64::max);
        for j in 0..n {
            let (a, b) = (f64::from(device_scores[r][j]), reference_scores[r][j]);
            // `a == b` for the -inf a max-pool or max-reduce leaves over an all-NaN window.
            assert!(
                a == b || (a - b).abs() <= SCORE_TOL * top || (a.is_nan() && b.is_nan()),
                "row {r} token {j}: device {a} vs reference {b} (row max {top})"
            );
        }
    }
    let as_f64 = |s: &[f32]| s.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    let rows_per_seq = rows / case.batch;
    let budgets: Vec<usize> = match &case.budgets {
        CaseBudgets::PerRow(b) => b.iter().map(|&x| x as usize).collect(),
        CaseBudgets::AdaKv { base, floor_alpha } => {
            let mut out = Vec::new();
            for b in 0..case.batch {
                let seq = b * rows_per_seq..(b + 1) * rows_per_seq;
                let dev: Vec<Vec<f64>> = device_scores[seq.clone()].iter().map(|s| as_f64(s)).collect();
                let from_dev = reference::adakv_budgets(&dev, w, *base as usize, *floor_alpha);
                let from_ref =
                    reference::adakv_budgets(&reference_scores[seq], w, *base as usize, *floor_alpha);
                if from_dev != from_ref {
                    // Only a near tie at the global cut may move a count between rows.
                    let mut all: Vec<f64> = dev.iter().flatten().copied().collect();
                    all.sort_by(|a, b| b.total_cmp(a));
                    let total = (rows_per_seq * (*base as usize - w)).min(all.len());
                    let top = all.first().copied().unwrap_or(0.0);
                    assert!(
                        total > 0
                            && total < all.len()
                            && (all[total - 1] - all[total]).abs() <= 2.0 * SCORE_TOL * top,
                        "sequence {b}: AdaKV budgets {from_dev:?} (device scores) vs {from_ref:?} (reference) without a near tie"
                    );
                }
                out.extend(from_dev);
            }
            out
        }
    };
    let kept = ws.kept(store).unwrap();
    assert_eq!(kept.len(), rows);
    let layout = cache.layout().clone();
    let (kc, vc) = (store.download(cache.k()).unwrap(), store.download(cache.v()).unwrap());
    for r in 0..rows {
        let want_count = budgets[r].min(q);
        let dev_sel: Vec<usize> = reference::select_positions(&as_f64(&device_scores[r]), w, budgets[r]);
        let got: Vec<usize> = kept[r].iter().map(|&p| p as usize).collect();
        assert_eq!(got, dev_sel, "row {r}: kernel selection differs from the reference over the same scores");
        assert_eq!(got.len(), want_count, "row {r}: count");
        assert!(got.windows(2).all(|p| p[0] < p[1]), "row {r}: not ascending");
        assert!((n..q).all(|t| got.contains(&t)), "row {r}: window missing");
        // End to end against the f64 reference, with the near-tie excuse.
        let ref_sel = reference::select_positions(&reference_scores[r], w, budgets[r]);
        if got != ref_sel && budgets[r] < q {
            let kth = budgets[r] - w;
            let mut sorted: Vec<f64> = reference_scores[r].clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let cut = sorted[kth - 1];
            let top = sorted[0];
            for &t in
                got.iter().filter(|t| !ref_sel.contains(t)).chain(ref_sel.iter().filter(|t| !got.contains(t)))
            {
                assert!(
                    (reference_scores[r][t] - cut).abs() <= 2.0 * SCORE_TOL * top,
                    "row {r}: token {t} (reference score {}) differs from the reference selection, cut {cut}",
                    reference_scores[r][t]
                );
            }
        }
        let seg = layout.segments()[r];
        assert_eq!(seg.len as usize, want_count, "row {r}: segment len");
        let src = if per_qh { r / g } else { r };
        for (i, &t) in got.iter().enumerate() {
            let row = seg.row(i as u32) as usize;
            let from = (src * q + t) * d;
            assert_eq!(raw(&kc[row * d..(row + 1) * d]), raw(&k[from..from + d]), "row {r} K of token {t}");
            assert_eq!(raw(&vc[row * d..(row + 1) * d]), raw(&v[from..from + d]), "row {r} V of token {t}");
        }
    }
    SelectOutcome { kept, device_scores, reference_scores, budgets, cache }
}

/// One R-KV scenario (see [`rkv_scenario`]): Full segments of the given lengths (capacity
/// len + 3) or Streaming ones (sink, window; filled), `pushes` decode steps of queries.
#[derive(Clone, Debug)]
pub struct RkvCase {
    pub batch: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
    /// Per segment: Ok(len) for Full, Err((sink, window)) for Streaming.
    pub segs: Vec<Result<u32, (u32, u32)>>,
    pub opts: headwise::redundancy::RkvOptions,
    pub pushes: usize,
    pub forced: Option<Vec<bool>>,
    /// Per segment, duplicate key rows: (source position, copies at these positions).
    pub duplicates: Vec<(usize, usize, Vec<usize>)>,
    pub seed: u64,
}

/// What an R-KV scenario saw.
pub struct RkvOutcome {
    pub kept: Vec<Option<Vec<u32>>>,
}

/// Relative (to the largest |score| of the segment) distance under which two R-KV scores count
/// as a near tie: f32 against f64 over D-term dot products, softmaxes over len terms.
pub const RKV_SCORE_TOL: f64 = 2e-5;

/// Runs one R-KV step through `store` and the f64 reference on the same data and checks:
/// which segments were compacted; device candidate scores within RKV_SCORE_TOL of the reference;
/// the kernel's kept set equal to the reference selection over the device's own scores
/// (exact), and to the reference's kept set up to near ties at the cut; compacted rows
/// byte-identical to the rows they came from; every other segment's rows untouched; host
/// layout and device table agreeing, compacted lens equal to the budget.
pub fn rkv_scenario<S: Store, T: KvElem>(store: &S, case: &RkvCase) -> RkvOutcome {
    use headwise::redundancy::{QueryRing, RkvTrigger, RkvWorkspace, evict};
    use headwise::reference::rkv;
    let d = case.head_dim;
    let mut off = 0u32;
    let segs: Vec<Segment> = case
        .segs
        .iter()
        .map(|s| {
            let seg = match *s {
                Ok(len) => Segment::full(off, len + 3, len),
                Err((sink, window)) => {
                    let mut g = Segment::streaming(off, sink, window);
                    g.len = sink + window;
                    g
                }
            };
            off += seg.capacity + 1;
            seg
        })
        .collect();
    let layout = LayerLayout::new(case.batch, case.kv_heads, u64::from(off), segs).unwrap();
    let rows = layout.total_rows();
    let mut k: Vec<T> = values(case.seed, rows * d, 1.0);
    let v: Vec<T> = values(case.seed ^ 0x77, rows * d, 1.0);
    for &(s, src, ref copies) in &case.duplicates {
        let seg = layout.segments()[s];
        let from = seg.row(src as u32) as usize * d;
        let row: Vec<T> = k[from..from + d].to_vec();
        for &c in copies {
            let to = seg.row(c as u32) as usize * d;
            k[to..to + d].copy_from_slice(&row);
        }
    }
    let heads = layout.segments().len() * case.group;
    let mut ring = QueryRing::<S, T>::new(store, heads, case.opts.alpha, d).unwrap();
    let mut ring_ref = rkv::QueryRing::<T>::new(heads, case.opts.alpha, d).unwrap();
    for step in 0..case.pushes {
        let q: Vec<T> = values(case.seed ^ (0x1000 + step as u64), heads * d, 1.0);
        ring.push(&store.upload(&q).unwrap()).unwrap();
        ring_ref.push(&q).unwrap();
    }
    let mut cache = LayerCache::from_parts(
        store,
        layout.clone(),
        d,
        store.upload(&k).unwrap(),
        store.upload(&v).unwrap(),
    )
    .unwrap();
    let trigger = match &case.forced {
        Some(m) => RkvTrigger::Forced(m),
        None => RkvTrigger::Threshold,
    };
    let mut ws = RkvWorkspace::new();
    let done = evict(&mut cache, &ring, case.group, &case.opts, trigger, &mut ws).unwrap();

    let (mut lay_ref, mut k_ref, mut v_ref) = (layout.clone(), k.clone(), v.clone());
    let expect =
        rkv::rkv_step(&mut lay_ref, &mut k_ref, &mut v_ref, &ring_ref, case.group, &case.opts, trigger)
            .unwrap();
    let scores: std::collections::HashMap<usize, Vec<f32>> = ws.scores(store).unwrap().into_iter().collect();
    let kept_dev: std::collections::HashMap<usize, Vec<u32>> = ws.kept(store).unwrap().into_iter().collect();
    let (kc, vc) = (store.download(cache.k()).unwrap(), store.download(cache.v()).unwrap());
    let (a, w, budget) = (case.opts.alpha, case.opts.alpha, case.opts.budget);
    let mut out = Vec::new();
    for (s, seg) in layout.segments().iter().enumerate() {
        let compacted = expect[s].is_some() && seg.len as usize > budget;
        assert_eq!(done[s], compacted, "segment {s}: compacted?");
        let new_seg = cache.layout().segments()[s];
        if !compacted {
            assert_eq!(new_seg, *seg, "segment {s}: layout changed");
            for i in 0..seg.capacity {
                let r = (seg.offset + i) as usize * d;
                assert_eq!(raw(&kc[r..r + d]), raw(&k[r..r + d]), "segment {s} row {i} K touched");
                assert_eq!(raw(&vc[r..r + d]), raw(&v[r..r + d]), "segment {s} row {i} V touched");
            }
            out.push(None);
            continue;
        }
        assert_eq!(new_seg.len as usize, budget, "segment {s}: len");
        let len = seg.len as usize;
        let keys = &k[seg.offset as usize * d..(seg.offset as usize + len) * d];
        let reference =
            rkv::rkv_scores(keys, &ring_ref.group(s * case.group, case.group), case.group, d, &case.opts);
        let dev = &scores[&s];
        assert_eq!(dev.len(), len - a);
        let top = reference.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for j in 0..len - a {
            let (x, y) = (f64::from(dev[j]), reference[j]);
            assert!(
                (x - y).abs() <= RKV_SCORE_TOL * top || (x.is_nan() && y.is_nan()),
                "segment {s} token {j}: device {x} vs reference {y} (max |score| {top})"
            );
        }
        let dev64: Vec<f64> = dev.iter().map(|&x| f64::from(x)).collect();
        let got: Vec<usize> = kept_dev[&s].iter().map(|&p| p as usize).collect();
        assert_eq!(
            got,
            reference::select_positions(&dev64, w, budget),
            "segment {s}: selection over device scores"
        );
        let want = expect[s].as_ref().unwrap();
        if &got != want {
            let mut sorted = reference.clone();
            sorted.sort_by(|x, y| y.total_cmp(x));
            let cut = sorted[budget - w - 1];
            for &t in got.iter().filter(|t| !want.contains(t)).chain(want.iter().filter(|t| !got.contains(t)))
            {
                assert!(
                    (reference[t] - cut).abs() <= 2.0 * RKV_SCORE_TOL * top,
                    "segment {s}: token {t} (reference score {}) differs from the reference, cut {cut}",
                    reference[t]
                );
            }
        }
        for (i, &t) in got.iter().enumerate() {
            let (to, from) = ((seg.offset as usize + i) * d, (seg.offset as usize + t) * d);
            assert_eq!(raw(&kc[to..to + d]), raw(&k[from..from + d]), "segment {s}: K row {i} (token {t})");
            assert_eq!(raw(&vc[to..to + d]), raw(&v[from..from + d]), "segment {s}: V row {i} (token {t})");
        }
        out.push(Some(got.iter().map(|&t| t as u32).collect()));
    }
    assert_eq!(store.download(cache.device_table()).unwrap(), cache.layout().device_table(), "device table");
    RkvOutcome { kept: out }
}

/// Compares generated text with the committed file `rel` (relative to the crate root), or, under
/// `HEADWISE_BLESS=1`, rewrites the file: the freshness tests of the generated files
/// (src/params.rs by bindgen, include/headwise.h by cbindgen).
pub fn assert_fresh(rel: &str, fresh: &str, test: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    if std::env::var("HEADWISE_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{rel} is stale: run `HEADWISE_BLESS=1 cargo test --test {test}` and commit it"
    );
}
