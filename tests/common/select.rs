//! Prefill-compression scenarios beyond [`select_scenario`]: long rows, planted ties, NaN,
//! forced chunk splits, compression into an existing cache, and decode attention from the
//! result. Generic over the store, so the emulator (tests/select.rs) and the GPU (tests/gpu.rs)
//! run the same checks at different sizes.

use super::{
    CaseBudgets, SelectCase, SelectData, SelectOutcome, bits, raw, select_data, select_scenario,
    select_scenario_on, values,
};
use headwise::layout::{LayerLayout, Segment};
use headwise::select::{
    Budgets, GqaReduce, Granularity, Pool, Prompt, SelectOptions, SelectWorkspace, compress_into,
};
use headwise::{AttentionOptions, AttentionWorkspace, Error, KvElem, LayerCache, Store, reference};
use proptest::prelude::*;

fn opts(window: usize) -> SelectOptions {
    SelectOptions { window, ..SelectOptions::default() }
}

/// Score rows of a case: one per KV head, or one per query head.
pub fn score_rows(case: &SelectCase) -> usize {
    let g = if case.opts.granularity == Granularity::QueryHead { case.group } else { 1 };
    case.batch * case.kv_heads * g
}

/// The prompt segment (sequence * kv_heads + KV head) a score row reads.
fn source(case: &SelectCase, row: usize) -> usize {
    if case.opts.granularity == Granularity::QueryHead { row / case.group } else { row }
}

/// What a row keeps when every prefix score ties (or is NaN): the lowest positions, then the
/// window.
fn lowest_and_window(q: usize, window: usize, budget: usize) -> Vec<u32> {
    if budget >= q {
        return (0..q as u32).collect();
    }
    let n = q - window;
    (0..(budget - window) as u32).chain(n as u32..q as u32).collect()
}

/// Random cases over every option: batch, KV heads, group, head_dim, window, prefix length,
/// pooling, GQA reduction, granularity, forced chunk, per-row or AdaKV budgets.
pub fn case_strategy(max_prefix: usize) -> impl Strategy<Value = SelectCase> {
    (
        1usize..3,
        1usize..3,
        prop::sample::select(vec![1usize, 2, 3, 4, 8]),
        prop::sample::select(vec![64usize, 128, 256]),
        1usize..12,
        0usize..max_prefix,
        prop::sample::select(vec![1usize, 3, 5, 7]),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(1u32..60),
        any::<u64>(),
    )
        .prop_flat_map(
            |(batch, kv_heads, group, head_dim, window, prefix, kernel, avg, max, per_qh, chunk, seed)| {
                let q = window + prefix;
                let rows = batch * kv_heads * if per_qh { group } else { 1 };
                let per_row = proptest::collection::vec(window as u32..(q + 8) as u32, rows)
                    .prop_map(CaseBudgets::PerRow);
                let ada = (window as u32..(q + 8) as u32, prop::sample::select(vec![0.0f32, 0.2, 0.5, 1.0]))
                    .prop_map(|(base, floor_alpha)| CaseBudgets::AdaKv { base, floor_alpha });
                let budgets = prop_oneof![3 => per_row, 1 => ada];
                budgets.prop_map(move |budgets| SelectCase {
                    batch,
                    kv_heads,
                    group,
                    q: q.max(kernel),
                    head_dim,
                    opts: SelectOptions {
                        window,
                        pool_kernel: kernel,
                        pool: if avg { Pool::Avg } else { Pool::Max },
                        gqa: if max { GqaReduce::Max } else { GqaReduce::Mean },
                        granularity: if per_qh { Granularity::QueryHead } else { Granularity::KvHead },
                        chunk_tokens: chunk,
                        ..SelectOptions::default()
                    },
                    budgets,
                    seed,
                })
            },
        )
}

/// Rows of `prefix` tokens, far past what a block's shared memory holds (the keys of one row
/// are 4 bytes per token), through the radix select in global memory: per-row budgets of one
/// token, about half and all but one; AdaKV, whose global cut runs over all the rows at once;
/// and all-zero keys, where every prefix score of a row is exactly equal (every logit is 0) and
/// the rows must keep exactly their lowest positions.
pub fn long_rows<S: Store, T: KvElem>(store: &S, prefix: usize, window: usize, seed: u64) {
    let q = prefix + window;
    let (w, n) = (window as u32, prefix as u32);
    let mut c = SelectCase {
        batch: 1,
        kv_heads: 2,
        group: 1,
        q,
        head_dim: 64,
        opts: opts(window),
        budgets: CaseBudgets::PerRow(vec![w + 1, w + n / 2 + 7]),
        seed,
    };
    select_scenario::<S, T>(store, &c);
    c.budgets = CaseBudgets::PerRow(vec![q as u32 - 1, w + 3]);
    select_scenario::<S, T>(store, &c);
    c.budgets = CaseBudgets::AdaKv { base: w + 700, floor_alpha: 0.2 };
    select_scenario::<S, T>(store, &c);

    let mut data = select_data::<T>(&c);
    data.k.fill(T::from_f32(0.0));
    let budgets = [w + n / 3 + 1, q as u32 - 1];
    c.budgets = CaseBudgets::PerRow(budgets.to_vec());
    let out = select_scenario_on(store, &c, &data);
    for (r, s) in out.device_scores.iter().enumerate() {
        assert!(s.iter().all(|x| x.to_bits() == s[0].to_bits()), "row {r}: zero keys must tie exactly");
        assert_eq!(out.kept[r], lowest_and_window(q, window, budgets[r] as usize), "row {r}");
    }
}

/// Runs of identical key rows plant exact score ties in the middle of a prompt: run A (a key
/// aligned with the group's window queries, so it scores near the top) and run B (copies of an
/// ordinary key, in the middle of the ranking). Budgets are placed so that the cut falls inside
/// each tie group; the kept set must then equal the f64 reference token for token, with no
/// near-tie excuse, because a tie is exact in f64 and on the device alike (same inputs, same
/// arithmetic) and both break it by the lower position.
pub fn tied_runs<S: Store, T: KvElem>(store: &S, head_dim: usize, group: usize, pool: Pool, seed: u64) {
    let (w, q, d, g) = (4usize, 400usize, head_dim, group);
    let n = q - w;
    let (run_a, run_b) = (100..160, 250..290);
    let mut c = SelectCase {
        batch: 1,
        kv_heads: 2,
        group,
        q,
        head_dim,
        opts: SelectOptions { pool, ..opts(w) },
        budgets: CaseBudgets::PerRow(vec![]),
        seed,
    };
    let mut data = select_data::<T>(&c);
    for s in 0..c.kv_heads {
        let qs = &data.queries[s * g * w * d..(s + 1) * g * w * d];
        let aligned: Vec<T> = (0..d)
            .map(|j| {
                let sum: f32 = (0..g * w).map(|i| qs[i * d + j].to_f32()).sum();
                T::from_f32(if sum >= 0.0 { 1.0 } else { -1.0 })
            })
            .collect();
        let ks = &mut data.k[s * q * d..(s + 1) * q * d];
        let ordinary: Vec<T> = ks[run_b.start * d..(run_b.start + 1) * d].to_vec();
        for t in run_a.clone() {
            ks[t * d..(t + 1) * d].copy_from_slice(&aligned);
        }
        for t in run_b.clone() {
            ks[t * d..(t + 1) * d].copy_from_slice(&ordinary);
        }
    }
    let reference: Vec<Vec<f64>> = (0..c.kv_heads)
        .map(|s| {
            reference::snapkv_scores(
                &data.k[s * q * d..(s + 1) * q * d],
                &data.queries[s * g * w * d..(s + 1) * g * w * d],
                d,
                w,
                c.opts.pool_kernel,
                pool,
                GqaReduce::Mean,
            )
        })
        .collect();
    let mut cut_a_small = false;
    for probe in [run_a.start + 30, run_b.start + 20] {
        // Per row: how many score above the tie, how many tie. Cuts: just inside, the middle,
        // and one short of the group's end.
        let groups: Vec<(usize, usize)> = reference
            .iter()
            .map(|s| {
                let v = s[probe];
                (s.iter().filter(|&&x| x > v).count(), s.iter().filter(|&&x| x == v).count())
            })
            .collect();
        for &(above, tied) in &groups {
            assert!(tied >= 10, "the planted run must tie ({tied} tokens tie)");
            cut_a_small |= probe < run_b.start && above < 20;
        }
        for pick in [1, 0, 2] {
            let budgets: Vec<u32> = groups
                .iter()
                .map(|&(above, tied)| (w + above + [1, tied / 2, tied - 1][pick]) as u32)
                .collect();
            c.budgets = CaseBudgets::PerRow(budgets.clone());
            let out = select_scenario_on(store, &c, &data);
            for r in 0..c.kv_heads {
                let (dev, rf) = (&out.device_scores[r], &reference[r]);
                let tie = dev[probe];
                for t in 0..n {
                    assert_eq!(
                        dev[t] == tie,
                        rf[t] == rf[probe],
                        "row {r} token {t}: the device ties with token {probe} where the reference does not (or vice versa)"
                    );
                }
                let want = reference::select_positions(rf, w, budgets[r] as usize);
                let got: Vec<usize> = out.kept[r].iter().map(|&p| p as usize).collect();
                assert_eq!(got, want, "row {r}, budget {}: kept set differs from the reference", budgets[r]);
            }
        }
    }
    assert!(cut_a_small, "run A should rank near the top, so its cuts are small budgets");
}

/// A NaN planted by `poison` into otherwise clean data. Every row in `hit` (score rows that see
/// the NaN) must come out with all scores NaN before pooling, which the pooled scores show as
/// NaN (avg pooling sums it) or -inf (max pooling and the max GQA reduction drop NaN operands,
/// as fmaxf does, starting from -inf); either ranks below every number, so those rows keep their
/// lowest positions plus the window. Every other row must be bit-for-bit the clean run.
pub fn nan_scenario<S: Store, T: KvElem>(
    store: &S,
    case: &SelectCase,
    poison: impl Fn(&mut SelectData<T>),
    hit: &[usize],
) {
    let CaseBudgets::PerRow(budgets) = &case.budgets else { panic!("per-row budgets only") };
    let clean = select_scenario::<S, T>(store, case);
    let mut data = select_data::<T>(case);
    poison(&mut data);
    let out = select_scenario_on(store, case, &data);
    let nan_stays = case.opts.pool == Pool::Avg
        && !(case.opts.granularity == Granularity::KvHead && case.opts.gqa == GqaReduce::Max);
    for (r, s) in out.device_scores.iter().enumerate() {
        if hit.contains(&r) {
            assert!(
                s.iter().all(|x| if nan_stays { x.is_nan() } else { *x == f32::NEG_INFINITY }),
                "row {r} saw the NaN: its scores must all be {}, got {:?}",
                if nan_stays { "NaN" } else { "-inf" },
                &s[..4.min(s.len())]
            );
            assert_eq!(
                out.kept[r],
                lowest_and_window(case.q, case.opts.window, budgets[r] as usize),
                "row {r}"
            );
        } else {
            let same = s.iter().zip(&clean.device_scores[r]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "row {r} never sees the NaN but its scores changed");
            assert_eq!(out.kept[r], clean.kept[r], "row {r}");
        }
    }
}

/// The planner's chunk against forced ones. What a split changes: each window query's softmax
/// state (max, sum of exp2) is folded chunk by chunk, so its sum is rounded in another order
/// and may move by a few f32 ulps (the max is exact in any order). The scoring itself (each
/// token's probabilities, summed over the window in row order, the group reduction and the
/// pooling) does not depend on the split. So every score may move by at most a few ulps
/// relative, and a kept set may change only where two scores are that close at the cut: the
/// near-tie rule with an f32-ulp tolerance (`SPLIT_TOL`), far tighter than the f64-reference
/// one. Exact equality cannot be promised, so it is not asserted; AdaKV's counts follow the
/// same rule at the global cut.
pub fn chunk_splits<S: Store, T: KvElem>(
    store: &S,
    head_dim: usize,
    per_row_chunks: &[u32],
    adakv_chunks: &[u32],
    seed: u64,
) {
    // A reordered f32 sum of q positive terms moves by at most (q - 1) ulps and in practice by a
    // few (the emulator shows at most 2 ulps, 2.4e-7, at q = 300); a lost or doubled chunk would
    // move scores by about 1 / splits.
    const SPLIT_TOL: f64 = 1e-5;
    let q = 200;
    let mut c = SelectCase {
        batch: 2,
        kv_heads: 2,
        group: 4,
        q,
        head_dim,
        opts: opts(16),
        budgets: CaseBudgets::PerRow(vec![17, 48, 110, 199]),
        seed,
    };
    let ada = CaseBudgets::AdaKv { base: 60, floor_alpha: 0.2 };
    for (budgets, chunks) in [(c.budgets.clone(), per_row_chunks), (ada, adakv_chunks)] {
        c.budgets = budgets;
        c.opts.chunk_tokens = None;
        let planned = select_scenario::<S, T>(store, &c);
        for &chunk in chunks {
            c.opts.chunk_tokens = Some(chunk);
            let out = select_scenario::<S, T>(store, &c);
            if out.budgets != planned.budgets {
                // AdaKV: a count may move between rows only at a near tie of the global cut.
                let CaseBudgets::AdaKv { base, .. } = c.budgets else { panic!("per-row budgets changed") };
                let per_seq = score_rows(&c) / c.batch;
                for b in 0..c.batch {
                    let seq = b * per_seq..(b + 1) * per_seq;
                    if out.budgets[seq.clone()] == planned.budgets[seq.clone()] {
                        continue;
                    }
                    let mut all: Vec<f32> = planned.device_scores[seq].iter().flatten().copied().collect();
                    all.sort_by(|x, y| y.total_cmp(x));
                    let total = per_seq * (base as usize - c.opts.window);
                    let gap = f64::from(all[total - 1]) - f64::from(all[total]);
                    assert!(
                        gap <= 2.0 * SPLIT_TOL * f64::from(all[0]),
                        "chunk {chunk}: AdaKV budgets {:?} vs {:?} without a near tie",
                        out.budgets,
                        planned.budgets
                    );
                }
            }
            for r in 0..score_rows(&c) {
                if out.budgets[r] != planned.budgets[r] {
                    continue; // checked above; select_scenario checked the set itself
                }
                let (a, b) = (&planned.device_scores[r], &out.device_scores[r]);
                let top = a.iter().copied().fold(0.0f32, f32::max) as f64;
                for t in 0..a.len() {
                    let diff = (f64::from(a[t]) - f64::from(b[t])).abs();
                    assert!(
                        diff <= SPLIT_TOL * f64::from(a[t].abs()),
                        "chunk {chunk}, row {r}, token {t}: score {} vs {} with the planner's chunk",
                        b[t],
                        a[t]
                    );
                }
                if out.kept[r] == planned.kept[r] {
                    continue;
                }
                let mut sorted = a.clone();
                sorted.sort_by(|x, y| y.total_cmp(x));
                let k = planned.kept[r].len() - c.opts.window;
                let cut = f64::from(sorted[k.max(1) - 1]);
                let (x, y) = (&planned.kept[r], &out.kept[r]);
                for &t in x.iter().filter(|t| !y.contains(t)).chain(y.iter().filter(|t| !x.contains(t))) {
                    let s = f64::from(a[t as usize]);
                    assert!(
                        (s - cut).abs() <= 2.0 * SPLIT_TOL * top,
                        "chunk {chunk}, row {r}: token {t} (score {s}, cut {cut}) moved without a near tie"
                    );
                }
            }
        }
    }
}

/// A case's prompt on the store.
struct PromptBufs<S: Store, T: KvElem> {
    k: S::Buf<T>,
    v: S::Buf<T>,
    queries: S::Buf<T>,
}

impl<S: Store, T: KvElem> PromptBufs<S, T> {
    fn upload(store: &S, data: &SelectData<T>) -> Self {
        PromptBufs {
            k: store.upload(&data.k).unwrap(),
            v: store.upload(&data.v).unwrap(),
            queries: store.upload(&data.queries).unwrap(),
        }
    }

    fn prompt(&self, case: &SelectCase) -> Prompt<'_, S, T> {
        Prompt {
            k: &self.k,
            v: &self.v,
            queries: &self.queries,
            batch: case.batch,
            kv_heads: case.kv_heads,
            group_size: case.group,
            q_len: case.q,
            head_dim: case.head_dim,
            packing: Default::default(),
        }
    }
}

fn budgets_of(b: &CaseBudgets) -> Budgets<'_> {
    match b {
        CaseBudgets::PerRow(b) => Budgets::PerRow(b),
        CaseBudgets::AdaKv { base, floor_alpha } => Budgets::AdaKv { base: *base, floor_alpha: *floor_alpha },
    }
}

/// A destination for `counts` kept tokens per row: a gap of 1..=3 unused rows before every
/// segment, per-segment headroom 0..=4, stale lengths, and spare rows at the end.
fn gappy_layout(case: &SelectCase, counts: &[usize], shrink: Option<usize>) -> LayerLayout {
    let mut off = 0u32;
    let segs: Vec<Segment> = counts
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            off += 1 + (i % 3) as u32;
            let cap = c as u32 + (i % 5) as u32 - u32::from(shrink == Some(i)) * (1 + (i % 5) as u32);
            let s = Segment::full(off, cap, cap.min(2));
            off += cap;
            s
        })
        .collect();
    LayerLayout::new(case.batch, counts.len() / case.batch, u64::from(off) + 3, segs).unwrap()
}

fn field(e: Error) -> String {
    match e {
        Error::Invalid { field, .. } => field,
        e => panic!("expected Error::Invalid, got {e}"),
    }
}

/// [`compress_into`] an existing cache whose layout has gaps, headroom and stale lengths, filled
/// with a sentinel (random bit patterns, distinct per element): the kept rows (those
/// [`select_scenario`] validated through [`compress`]) land at each segment's offset, `len` is
/// set to the kept count, offsets and capacities stay, the device table follows, and every other
/// row (gaps, headroom, the tail) still holds the sentinel. Then the capacity errors: one row
/// too small is named (`dest.segments[i].capacity`), before any launch for per-row budgets (the
/// workspace still holds the previous selection) and after scoring for AdaKV (whose counts exist
/// only then), and in both cases the destination is untouched.
pub fn compress_into_scenario<S: Store, T: KvElem>(store: &S, granularity: Granularity, seed: u64) {
    let q = 90;
    let mut c = SelectCase {
        batch: 2,
        kv_heads: 2,
        group: 2,
        q,
        head_dim: 64,
        opts: SelectOptions { granularity, ..opts(6) },
        budgets: CaseBudgets::PerRow(vec![]),
        seed,
    };
    let rows = score_rows(&c);
    let per_row: Vec<u32> = (0..rows as u32).map(|r| [6, 20, 51, 200][r as usize % 4] + r).collect();
    let d = c.head_dim;
    let data = select_data::<T>(&c);
    let bufs = PromptBufs::upload(store, &data);
    for budgets in [CaseBudgets::PerRow(per_row), CaseBudgets::AdaKv { base: 30, floor_alpha: 0.2 }] {
        c.budgets = budgets;
        let want = select_scenario_on(store, &c, &data);
        let counts: Vec<usize> = want.kept.iter().map(Vec::len).collect();
        let layout = gappy_layout(&c, &counts, None);
        let elems = layout.total_rows() * d;
        let (sk, sv) = (bits::<T>(seed ^ 0x51, elems), bits::<T>(seed ^ 0x52, elems));
        let mut dest = LayerCache::from_parts(
            store,
            layout.clone(),
            d,
            store.upload(&sk).unwrap(),
            store.upload(&sv).unwrap(),
        )
        .unwrap();
        let mut ws = SelectWorkspace::new();
        compress_into(&mut dest, &bufs.prompt(&c), budgets_of(&c.budgets), &c.opts, &mut ws).unwrap();
        let got = dest.layout();
        for (i, (a, b)) in layout.segments().iter().zip(got.segments()).enumerate() {
            assert_eq!((a.offset, a.capacity, a.mode), (b.offset, b.capacity, b.mode), "segment {i} moved");
            assert_eq!(b.len as usize, counts[i], "segment {i}: len");
        }
        assert_eq!(got.total_rows(), layout.total_rows());
        assert_eq!(store.download(dest.device_table()).unwrap(), got.device_table(), "device table");
        let (kc, vc) = (store.download(dest.k()).unwrap(), store.download(dest.v()).unwrap());
        let mut expect_k = raw(&sk);
        let mut expect_v = raw(&sv);
        for (i, s) in got.segments().iter().enumerate() {
            let src = source(&c, i);
            for (j, &t) in want.kept[i].iter().enumerate() {
                let (to, from) = (s.row(j as u32) as usize * d, (src * q + t as usize) * d);
                expect_k[to..to + d].copy_from_slice(&raw(&data.k[from..from + d]));
                expect_v[to..to + d].copy_from_slice(&raw(&data.v[from..from + d]));
            }
        }
        assert!(raw(&kc) == expect_k, "K: a kept row is misplaced or a row outside the segments was written");
        assert!(raw(&vc) == expect_v, "V: a kept row is misplaced or a row outside the segments was written");

        // One segment one row short.
        let short = rows - 2;
        let small = gappy_layout(&c, &counts, Some(short));
        let elems = small.total_rows() * d;
        let mut dest = LayerCache::from_parts(
            store,
            small.clone(),
            d,
            store.upload(&sk[..elems]).unwrap(),
            store.upload(&sv[..elems]).unwrap(),
        )
        .unwrap();
        let before = ws.kept(store).unwrap();
        let e =
            compress_into(&mut dest, &bufs.prompt(&c), budgets_of(&c.budgets), &c.opts, &mut ws).unwrap_err();
        assert_eq!(field(e), format!("dest.segments[{short}].capacity"));
        assert_eq!(dest.layout(), &small, "a refused call must leave the layout alone");
        assert!(raw(&store.download(dest.k()).unwrap()) == raw(&sk[..elems]), "a refused call wrote K");
        match c.budgets {
            // Known before launch: nothing ran, the workspace still holds the previous call.
            CaseBudgets::PerRow(_) => assert_eq!(ws.kept(store).unwrap(), before),
            // Known only after scoring: the selection ran (and is the same one).
            CaseBudgets::AdaKv { .. } => assert_eq!(ws.kept(store).unwrap(), want.kept),
        }
    }
}

/// Decode attention straight from a compressed cache: compress (with decode headroom), then
/// `LayerCache::attention` with the group size the layout implies (G per KV head, 1 per query
/// head: each query head owns its copy), compared with the f64 reference over the same cache
/// contents (SPEC section 7 tolerances). Then one decode step is appended into the headroom and
/// attention runs again, so the layout is ready for both.
pub fn attention_after_compress<S: Store, T: KvElem>(
    store: &S,
    granularity: Granularity,
    head_dim: usize,
    seed: u64,
) {
    let mut c = SelectCase {
        batch: 2,
        kv_heads: 2,
        group: 4,
        q: 200,
        head_dim,
        opts: SelectOptions { granularity, headroom: 1, ..opts(8) },
        budgets: CaseBudgets::PerRow(vec![]),
        seed,
    };
    let rows = score_rows(&c);
    c.budgets = CaseBudgets::PerRow((0..rows as u32).map(|r| 8 + 23 * r).collect());
    let SelectOutcome { mut cache, .. } = select_scenario::<S, T>(store, &c);
    let d = head_dim;
    let group = if granularity == Granularity::QueryHead { 1 } else { c.group };
    let heads = rows * group;
    assert_eq!(heads, c.batch * c.kv_heads * c.group, "every query head attends once");
    let tol = if T::DTYPE == headwise::DType::F16 { 1e-3 } else { 1e-2 };
    let mut ws = AttentionWorkspace::new();
    for step in 0..2 {
        if step == 1 {
            let new_k = store.upload(&values::<T>(seed ^ 0x77, rows * d, 1.0)).unwrap();
            let new_v = store.upload(&values::<T>(seed ^ 0x78, rows * d, 1.0)).unwrap();
            cache.append(&new_k, &new_v).unwrap();
        }
        let q: Vec<T> = values(seed ^ 0x99 ^ step, heads * d, 1.0);
        let mut out = store.zeros::<T>(heads * d).unwrap();
        let mut lse = store.zeros::<f32>(heads).unwrap();
        let dq = store.upload(&q).unwrap();
        cache.attention(&dq, group, &mut out, Some(&mut lse), &mut ws, &AttentionOptions::default()).unwrap();
        let (kc, vc) = (store.download(cache.k()).unwrap(), store.download(cache.v()).unwrap());
        let scale = 1.0 / (d as f64).sqrt();
        let (want, want_lse) = reference::attention(cache.layout(), d, &kc, &vc, &q, group, scale);
        let (got, got_lse) = (store.download(&out).unwrap(), store.download(&lse).unwrap());
        for h in 0..heads {
            let (o, r) = (&got[h * d..(h + 1) * d], &want[h * d..(h + 1) * d]);
            let err: f64 =
                o.iter().zip(r).map(|(a, b)| (f64::from(a.to_f32()) - b).powi(2)).sum::<f64>().sqrt();
            let norm: f64 = r.iter().map(|b| b * b).sum::<f64>().sqrt();
            assert!(
                err <= tol * norm.max(1e-3),
                "step {step}, head {h}: relative L2 error {:.3e}",
                err / norm
            );
            let (a, b) = (f64::from(got_lse[h]), want_lse[h]);
            assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "step {step}, head {h}: LSE {a} vs {b}");
        }
    }
}

/// The compression primitive with scores not from SnapKV: [`Score::KeyNorm`] computed by its
/// kernel, and scores given by the caller ([`compress_into_scored`]), with per-row budgets and
/// AdaKV, per KV head and per query head, against the reference (token-exact: the keys' norms
/// are exact multiples of `sqrt(head_dim)`, with planted ties; given scores include ties, NaN
/// and -inf, and pool by max, which rounds nothing). Queries are never read: the prompt has
/// none.
pub fn key_norm_and_given_scores<S: Store, T: KvElem>(store: &S, head_dim: usize, seed: u64) {
    use headwise::select::{Score, compress_into_scored};
    let (batch, kv_heads, group, q, window) = (2usize, 2usize, 2usize, 41usize, 5usize);
    let n = q - window;
    let segments = batch * kv_heads;
    // Row t of segment s: every element a, a from a small set of exact values (ties) and signs
    // (a and -a tie too), so ||k|| = |a| sqrt(d) orders exactly.
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut k_host = Vec::with_capacity(segments * q * head_dim);
    for _ in 0..segments * q {
        let r = next();
        let a = ((r % 12) as f32 + 1.0) / 16.0 * if r & 0x100 != 0 { -1.0 } else { 1.0 };
        k_host.extend(std::iter::repeat_n(T::from_f32(a), head_dim));
    }
    let v_host = values::<T>(seed ^ 0x55, segments * q * head_dim, 1.0);
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
        head_dim,
        packing: Default::default(),
    };
    for granularity in [Granularity::KvHead, Granularity::QueryHead] {
        let g = if granularity == Granularity::QueryHead { group } else { 1 };
        let rows = segments * g;
        let src = |row: usize| row / g;
        for pool_kernel in [1usize, 3] {
            let opts = SelectOptions {
                window,
                pool_kernel,
                pool: Pool::Max,
                granularity,
                ..SelectOptions::default()
            };
            let knorm: Vec<Vec<f64>> = (0..rows)
                .map(|r| {
                    let seg = &k_host[src(r) * q * head_dim..(src(r) + 1) * q * head_dim];
                    reference::pool_scores(
                        &reference::knorm_scores(seg, head_dim, window),
                        pool_kernel,
                        Pool::Max,
                    )
                })
                .collect();
            // Given scores: ties (a few values), NaN and -inf.
            let given: Vec<f32> = (0..rows * n)
                .map(|i| match next() % 9 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    r => (r % 4) as f32 * 0.25 + (i % 3) as f32,
                })
                .collect();
            let given_ref: Vec<Vec<f64>> = (0..rows)
                .map(|r| {
                    let row: Vec<f64> = given[r * n..(r + 1) * n].iter().map(|&s| f64::from(s)).collect();
                    reference::pool_scores(&row, pool_kernel, Pool::Max)
                })
                .collect();
            let given_buf = store.upload(&given).unwrap();
            let budgets: Vec<u32> =
                (0..rows).map(|_| (window + (next() as usize) % (q - window + 3)) as u32).collect();
            for (what, scores, want_scores) in
                [("KeyNorm", None, &knorm), ("given", Some(&given_buf), &given_ref)]
            {
                for adakv in [false, true] {
                    let label =
                        format!("{what} {granularity:?} pool {pool_kernel} adakv {adakv} d{head_dim}");
                    let counts: Vec<usize> = if adakv {
                        (0..batch)
                            .flat_map(|b| {
                                let per = rows / batch;
                                reference::adakv_budgets(
                                    &want_scores[b * per..(b + 1) * per],
                                    window,
                                    16,
                                    0.2,
                                )
                            })
                            .collect()
                    } else {
                        budgets.iter().map(|&b| b as usize).collect()
                    };
                    let segs =
                        (0..rows).map(|r| Segment::full((r * q) as u32, q as u32, 0)).collect::<Vec<_>>();
                    let layout = LayerLayout::new(batch, rows / batch, (rows * q) as u64, segs).unwrap();
                    let mut dest = LayerCache::<S, T>::new(store, layout, head_dim).unwrap();
                    let mut ws = SelectWorkspace::new();
                    let b = if adakv {
                        Budgets::AdaKv { base: 16, floor_alpha: 0.2 }
                    } else {
                        Budgets::PerRow(&budgets)
                    };
                    match scores {
                        None => {
                            let o = SelectOptions { score: Score::KeyNorm, ..opts };
                            compress_into(&mut dest, &prompt, b, &o, &mut ws).unwrap();
                        }
                        Some(s) => compress_into_scored(&mut dest, &prompt, s, b, &opts, &mut ws).unwrap(),
                    }
                    let kept = ws.kept(store).unwrap();
                    let got_k = store.download(dest.k()).unwrap();
                    for r in 0..rows {
                        let want: Vec<u32> = reference::select_positions(&want_scores[r], window, counts[r])
                            .into_iter()
                            .map(|p| p as u32)
                            .collect();
                        assert_eq!(kept[r], want, "{label}: row {r} positions");
                        let seg = dest.layout().segments()[r];
                        assert_eq!(seg.len as usize, want.len(), "{label}: row {r} len");
                        for (i, &p) in want.iter().enumerate() {
                            let from = (src(r) * q + p as usize) * head_dim;
                            let to = (seg.offset as usize + i) * head_dim;
                            assert_eq!(
                                bytemuck::cast_slice::<T, u16>(&got_k[to..to + head_dim]),
                                bytemuck::cast_slice::<T, u16>(&k_host[from..from + head_dim]),
                                "{label}: row {r} kept row {i} is prompt row {p}"
                            );
                        }
                    }
                }
            }
        }
    }
    // Given scores of the wrong length are refused by name, before any launch.
    let layout = LayerLayout::new(
        batch,
        kv_heads,
        (segments * q) as u64,
        (0..segments).map(|r| Segment::full((r * q) as u32, q as u32, 0)).collect(),
    )
    .unwrap();
    let mut dest = LayerCache::<S, T>::new(store, layout, head_dim).unwrap();
    let short = store.upload(&vec![0.0f32; segments * n - 1]).unwrap();
    let opts = SelectOptions { window, ..SelectOptions::default() };
    let err = compress_into_scored(
        &mut dest,
        &prompt,
        &short,
        Budgets::PerRow(&[8; 4]),
        &opts,
        &mut SelectWorkspace::new(),
    )
    .unwrap_err();
    assert!(matches!(&err, Error::Invalid { field, .. } if field == "scores"), "{err}");
    // SnapKV still needs its queries.
    let err = compress_into(&mut dest, &prompt, Budgets::PerRow(&[8; 4]), &opts, &mut SelectWorkspace::new())
        .unwrap_err();
    assert!(matches!(&err, Error::Invalid { field, .. } if field == "queries"), "{err}");
}

/// Attention sinks ([`SelectOptions::sink`]) and threshold keep ([`Budgets::Threshold`]), with
/// per-row budgets, AdaKV and thresholds, per KV head and per query head, on given scores (with
/// ties, NaN and -inf) and on KNorm, against the reference: sinks scored `+inf` after pooling
/// (`reference::protect_sinks`), the threshold's count (`reference::threshold_budget`), then
/// the same top-k. Token-exact: given scores pool by max (no rounding) and the KNorm keys'
/// norms are exact multiples of `sqrt(head_dim)`.
pub fn sinks_and_threshold<S: Store, T: KvElem>(store: &S, head_dim: usize, group: usize, seed: u64) {
    use headwise::select::{Score, compress, compress_into_scored};
    let (batch, kv_heads, q, window, sink) = (2usize, 2usize, 41usize, 5usize, 3usize);
    let n = q - window;
    let segments = batch * kv_heads;
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut k_host = Vec::with_capacity(segments * q * head_dim);
    for _ in 0..segments * q {
        let a = ((next() % 12) as f32 + 1.0) / 16.0;
        k_host.extend(std::iter::repeat_n(T::from_f32(a), head_dim));
    }
    let (k, none) = (store.upload(&k_host).unwrap(), store.zeros::<T>(0).unwrap());
    let prompt = Prompt {
        k: &k,
        v: &k,
        queries: &none,
        batch,
        kv_heads,
        group_size: group,
        q_len: q,
        head_dim,
        packing: Default::default(),
    };
    for granularity in [Granularity::KvHead, Granularity::QueryHead] {
        let g = if granularity == Granularity::QueryHead { group } else { 1 };
        let rows = segments * g;
        let given: Vec<f32> = (0..rows * n)
            .map(|_| match next() % 16 {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                r => (r % 6) as f32,
            })
            .collect();
        let given_buf = store.upload(&given).unwrap();
        for pool_kernel in [1usize, 3] {
            // Reference pooled scores per row, sinks protected.
            let pooled = |knorm: bool| -> Vec<Vec<f64>> {
                (0..rows)
                    .map(|r| {
                        let raw: Vec<f64> = if knorm {
                            let s = r / g;
                            reference::knorm_scores(
                                &k_host[s * q * head_dim..(s + 1) * q * head_dim],
                                head_dim,
                                window,
                            )
                        } else {
                            given[r * n..(r + 1) * n].iter().map(|&v| f64::from(v)).collect()
                        };
                        let mut p = reference::pool_scores(&raw, pool_kernel, Pool::Max);
                        reference::protect_sinks(&mut p, sink);
                        p
                    })
                    .collect()
            };
            let per_row: Vec<u32> = (0..rows).map(|r| (window + sink + (r * 7) % 20) as u32).collect();
            for knorm in [false, true] {
                let want_scores = pooled(knorm);
                let opts = SelectOptions {
                    window,
                    pool_kernel,
                    granularity,
                    sink,
                    score: if knorm { Score::KeyNorm } else { Score::SnapKv },
                    ..SelectOptions::default()
                };
                for budgets in [
                    Budgets::PerRow(&per_row),
                    Budgets::AdaKv { base: 12, floor_alpha: 0.2 },
                    // Fewer prefix tokens per row than sinks: the global top is sinks only, so
                    // the floor of min(sink, n) per row decides.
                    Budgets::AdaKv { base: (window + 2) as u32, floor_alpha: 0.2 },
                    Budgets::Threshold(2.0),
                    Budgets::Threshold(-0.5),
                    Budgets::Threshold(f32::NEG_INFINITY),
                    Budgets::Threshold(f32::INFINITY),
                ] {
                    let ctx = format!(
                        "{budgets:?}, knorm {knorm}, pool {pool_kernel}, {granularity:?}, d{head_dim}"
                    );
                    let mut ws = SelectWorkspace::new();
                    if knorm {
                        compress(store, &prompt, budgets, &opts, &mut ws).unwrap();
                    } else {
                        let l = headwise::LayoutBuilder::new(batch, kv_heads * g).headroom(q as u32);
                        let l = (0..rows).fold(l, |l, r| l.full(r / (kv_heads * g), r % (kv_heads * g), 0));
                        let mut dest = LayerCache::new(store, l.build().unwrap(), head_dim).unwrap();
                        compress_into_scored(&mut dest, &prompt, &given_buf, budgets, &opts, &mut ws)
                            .unwrap();
                    }
                    let kept = ws.kept(store).unwrap();
                    let want_budgets: Vec<usize> = match budgets {
                        Budgets::PerRow(b) => b.iter().map(|&x| x as usize).collect(),
                        Budgets::AdaKv { base, floor_alpha } => (0..batch)
                            .flat_map(|b| {
                                let seq = &want_scores[b * kv_heads * g..(b + 1) * kv_heads * g];
                                reference::adakv_budgets(seq, window, base as usize, floor_alpha)
                                    .into_iter()
                                    .map(|x| x.max(window + sink))
                            })
                            .collect(),
                        Budgets::Threshold(t) => want_scores
                            .iter()
                            .map(|s| reference::threshold_budget(s, window, f64::from(t)))
                            .collect(),
                    };
                    for r in 0..rows {
                        let want = reference::select_positions(&want_scores[r], window, want_budgets[r]);
                        let got: Vec<usize> = kept[r].iter().map(|&p| p as usize).collect();
                        assert_eq!(got, want, "{ctx}: row {r}");
                        assert!((0..sink).all(|t| got.contains(&t)), "{ctx}: row {r} lost a sink");
                    }
                }
            }
        }
    }
}
