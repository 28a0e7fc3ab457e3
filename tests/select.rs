//! Prefill compression through the emulator against the f64 reference (see
//! common::select_scenario for what is checked).
#![cfg(feature = "emulator")]

mod common;

use common::select::{
    attention_after_compress, case_strategy, chunk_splits, compress_into_scenario, long_rows, nan_scenario,
    tied_runs,
};
use common::{CaseBudgets, SelectCase, select_scenario};
use half::{bf16, f16};
use headwise::layout::{LayerLayout, Segment};
use headwise::select::{
    Budgets, GqaReduce, Granularity, Pool, Prompt, SelectOptions, SelectWorkspace, compress, compress_into,
};
use headwise::{EmuStore, Error, KvElem, LayerCache, LayoutBuilder, Store};
use proptest::prelude::*;

fn cases() -> u32 {
    if std::env::var_os("HEADWISE_BIG_SWEEPS").is_some() { 64 } else { 8 }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn emulator_matches_reference_f16(case in case_strategy(150)) {
        select_scenario::<_, f16>(&EmuStore, &case);
    }

    #[test]
    fn emulator_matches_reference_bf16(case in case_strategy(150)) {
        select_scenario::<_, bf16>(&EmuStore, &case);
    }
}

fn uniform(case: &SelectCase, budget: u32) -> CaseBudgets {
    let rows = case.batch
        * case.kv_heads
        * if case.opts.granularity == Granularity::QueryHead { case.group } else { 1 };
    CaseBudgets::PerRow(vec![budget; rows])
}

fn base_case(head_dim: usize, group: usize, q: usize, window: usize) -> SelectCase {
    SelectCase {
        batch: 1,
        kv_heads: 2,
        group,
        q,
        head_dim,
        opts: SelectOptions { window, ..SelectOptions::default() },
        budgets: CaseBudgets::PerRow(vec![]),
        seed: 7,
    }
}

fn every_policy<T: KvElem>(head_dim: usize) {
    for (group, granularity) in [(4, Granularity::KvHead), (2, Granularity::QueryHead)] {
        let mut c = base_case(head_dim, group, 300, 16);
        c.opts.granularity = granularity;
        // SnapKV (uniform), PyramidKV/HeadKV (different per row), AdaKV.
        c.budgets = uniform(&c, 64);
        select_scenario::<_, T>(&EmuStore, &c);
        let rows = 2 * if granularity == Granularity::QueryHead { group } else { 1 };
        c.budgets = CaseBudgets::PerRow((0..rows as u32).map(|i| 16 + 37 * i).collect());
        select_scenario::<_, T>(&EmuStore, &c);
        c.budgets = CaseBudgets::AdaKv { base: 80, floor_alpha: 0.2 };
        select_scenario::<_, T>(&EmuStore, &c);
    }
}

#[test]
fn every_policy_dtype_and_head_dim() {
    for d in [64, 128, 256] {
        every_policy::<f16>(d);
        every_policy::<bf16>(d);
    }
}

#[test]
fn every_group_size_in_every_bucket() {
    for group in 1..=16 {
        let mut c = base_case(128, group, 140, 8);
        c.budgets = uniform(&c, 40);
        select_scenario::<_, f16>(&EmuStore, &c);
        c.head_dim = 64;
        select_scenario::<_, bf16>(&EmuStore, &c);
    }
}

#[test]
fn budget_edges() {
    let mut c = base_case(64, 2, 100, 10);
    // budget == window keeps only the window; >= q keeps everything; one more than the window.
    for b in [10, 11, 99, 100, 101, 5000] {
        c.budgets = uniform(&c, b);
        let out = select_scenario::<_, f16>(&EmuStore, &c);
        assert_eq!(out.kept[0].len(), (b as usize).min(100));
    }
    // window == q: nothing to score, everything kept.
    let mut c = base_case(64, 2, 12, 12);
    c.budgets = uniform(&c, 12);
    let out = select_scenario::<_, f16>(&EmuStore, &c);
    assert_eq!(out.kept[0], (0..12).collect::<Vec<u32>>());
}

/// Rows of 20k prefix tokens (the radix select's keys no longer fit a block's shared memory):
/// random keys under per-row and AdaKV budgets, and all-zero keys where every score ties.
#[test]
fn long_rows_f16() {
    long_rows::<_, f16>(&EmuStore, 20_000, 3, 11);
}

#[test]
fn long_rows_bf16_window_one() {
    long_rows::<_, bf16>(&EmuStore, 20_480, 1, 12);
}

/// All ties over more than 2^16 tokens: the scan that writes the kept positions carries its
/// counts across 256-token tiles, and every one of the lowest 40000 positions must be kept in
/// order.
#[test]
fn all_ties_on_a_very_long_row() {
    let (w, n) = (2usize, 70_000usize);
    let c = SelectCase {
        batch: 1,
        kv_heads: 1,
        group: 1,
        q: n + w,
        head_dim: 64,
        opts: SelectOptions { window: w, ..SelectOptions::default() },
        budgets: CaseBudgets::PerRow(vec![40_000 + w as u32]),
        seed: 5,
    };
    let mut data = common::select_data::<f16>(&c);
    data.k.fill(f16::ZERO);
    let out = common::select_scenario_on(&EmuStore, &c, &data);
    let want: Vec<u32> = (0..40_000).chain(n as u32..(n + w) as u32).collect();
    assert_eq!(out.kept[0], want);
}

#[test]
fn exact_ties_in_the_middle() {
    for (d, g, pool) in [(64, 1, Pool::Max), (128, 4, Pool::Max), (64, 2, Pool::Avg)] {
        tied_runs::<_, f16>(&EmuStore, d, g, pool, 21);
        tied_runs::<_, bf16>(&EmuStore, d, g, pool, 22);
    }
}

fn nan_case(granularity: Granularity, pool: Pool, gqa: GqaReduce) -> SelectCase {
    let c = SelectCase {
        batch: 1,
        kv_heads: 3,
        group: 2,
        q: 120,
        head_dim: 64,
        opts: SelectOptions { window: 8, pool, gqa, granularity, ..SelectOptions::default() },
        budgets: CaseBudgets::PerRow(vec![]),
        seed: 31,
    };
    let rows = common::select::score_rows(&c);
    SelectCase { budgets: CaseBudgets::PerRow((0..rows as u32).map(|r| 8 + 9 * r).collect()), ..c }
}

/// A NaN in one key of KV head 1 reaches every window query that sees that key: for a prefix
/// key that is all of them, for a window key the queries at or after it. Each such query's
/// softmax sum (over the whole row, the NaN logit included) is NaN, so are all its
/// probabilities, and the mean over the window is NaN for every prefix token. The head keeps
/// its lowest positions plus the window (module docs, "Non-finite inputs"); heads 0 and 2 are
/// bit-for-bit what they are without the NaN.
#[test]
fn a_nan_key_poisons_only_its_head() {
    let (q, d) = (120, 64);
    for granularity in [Granularity::KvHead, Granularity::QueryHead] {
        for (pool, gqa) in
            [(Pool::Max, GqaReduce::Mean), (Pool::Avg, GqaReduce::Mean), (Pool::Avg, GqaReduce::Max)]
        {
            let c = nan_case(granularity, pool, gqa);
            let hit: Vec<usize> = if granularity == Granularity::QueryHead { vec![2, 3] } else { vec![1] };
            for token in [40, 0, q - 8, q - 1] {
                let poison = |data: &mut common::SelectData<f16>| data.k[(q + token) * d + 5] = f16::NAN;
                nan_scenario::<_, f16>(&EmuStore, &c, poison, &hit);
            }
        }
    }
}

/// A NaN in one window query of query head 3 (KV head 1, second of its group): per KV head with
/// the mean over the group, the whole KV head is NaN; per query head, only that query head's
/// row (KV head 1's other query head selects normally); with the max over the group, nothing.
#[test]
fn a_nan_query_poisons_its_query_head() {
    let (w, d) = (8, 64);
    for (granularity, hit) in [(Granularity::KvHead, vec![1]), (Granularity::QueryHead, vec![3])] {
        let c = nan_case(granularity, Pool::Avg, GqaReduce::Mean);
        let poison = |data: &mut common::SelectData<bf16>| data.queries[(3 * w + 5) * d] = bf16::NAN;
        nan_scenario::<_, bf16>(&EmuStore, &c, poison, &hit);
    }
    // With the max over the group, fmaxf (and the reference's f64::max) drops the NaN query
    // head: KV head 1 is then scored by its other query head alone, finite, as the reference.
    let c = nan_case(Granularity::KvHead, Pool::Avg, GqaReduce::Max);
    let mut data = common::select_data::<bf16>(&c);
    data.queries[(3 * w + 5) * d] = bf16::NAN;
    let out = common::select_scenario_on(&EmuStore, &c, &data);
    assert!(out.device_scores[1].iter().all(|x| x.is_finite()));
}

/// AdaKV with a NaN head: its scores rank below every other head's, so it gets none of the
/// global top and keeps only the floor, `floor(alpha * (base - W))` prefix tokens, the lowest.
#[test]
fn adakv_gives_a_nan_head_only_the_floor() {
    let (q, d, w, base) = (120usize, 64usize, 8usize, 40usize);
    let mut c = nan_case(Granularity::KvHead, Pool::Max, GqaReduce::Mean);
    c.budgets = CaseBudgets::AdaKv { base: base as u32, floor_alpha: 0.2 };
    let mut data = common::select_data::<f16>(&c);
    data.k[(q + 50) * d] = f16::NAN;
    let out = common::select_scenario_on(&EmuStore, &c, &data);
    let floor = (0.2f64 * (base - w) as f64).floor() as usize;
    assert_eq!(out.budgets[1], floor + w);
    let want: Vec<u32> = (0..floor as u32).chain((q - w) as u32..q as u32).collect();
    assert_eq!(out.kept[1], want);
}

#[test]
fn forced_chunks_select_as_the_planner() {
    // The planner picks one 128-token tile per block at head_dim 64 (32 at 256): forced chunks
    // below, across and above a tile, and one chunk for the whole prompt.
    chunk_splits::<_, f16>(&EmuStore, 64, &[1, 7, 33, 199, 200], &[7, 1000], 41);
    chunk_splits::<_, bf16>(&EmuStore, 256, &[31, 33], &[33], 42);
}

#[test]
fn compress_into_a_layout_with_gaps_and_headroom() {
    compress_into_scenario::<_, f16>(&EmuStore, Granularity::KvHead, 51);
    compress_into_scenario::<_, bf16>(&EmuStore, Granularity::QueryHead, 52);
}

#[test]
fn attention_from_the_compressed_cache() {
    for d in [64, 128, 256] {
        attention_after_compress::<_, f16>(&EmuStore, Granularity::KvHead, d, 61 + d as u64);
        attention_after_compress::<_, bf16>(&EmuStore, Granularity::QueryHead, d, 62 + d as u64);
    }
}

fn field(e: Error) -> String {
    match e {
        Error::Invalid { field, .. } => field,
        e => panic!("expected Error::Invalid, got {e}"),
    }
}

/// The prompt buffers of a `batch` x `kv_heads` x `q` case with `group` and `window`.
struct Bufs {
    k: <EmuStore as Store>::Buf<f16>,
    v: <EmuStore as Store>::Buf<f16>,
    queries: <EmuStore as Store>::Buf<f16>,
}

fn bufs(segments: usize, q: usize, d: usize, query_rows: usize) -> Bufs {
    let data = |seed, n| EmuStore.upload(&common::values::<f16>(seed, n, 1.0)).unwrap();
    Bufs { k: data(1, segments * q * d), v: data(2, segments * q * d), queries: data(3, query_rows * d) }
}

impl Bufs {
    /// One sequence of two KV heads over these buffers.
    fn prompt(&self, group_size: usize, q_len: usize, head_dim: usize) -> Prompt<'_, EmuStore, f16> {
        Prompt {
            k: &self.k,
            v: &self.v,
            queries: &self.queries,
            batch: 1,
            kv_heads: 2,
            group_size,
            q_len,
            head_dim,
            packing: Default::default(),
        }
    }
}

/// Every invalid argument of `compress` is `Error::Invalid` naming the field, returned before
/// any launch: the workspace still reports the selection of the good call made first (a call
/// that reached the kernels would have replaced or cleared it).
#[test]
fn bad_inputs_are_named_errors_before_any_launch() {
    let (q, d, g, w) = (20usize, 64usize, 2usize, 4usize);
    let b = bufs(2, q, d, 2 * g * w);
    let p = b.prompt(g, q, d);
    let o = SelectOptions { window: w, pool_kernel: 3, ..SelectOptions::default() };
    let good = [9u32, 12];
    let mut ws = SelectWorkspace::new();
    compress(&EmuStore, &p, Budgets::PerRow(&good), &o, &mut ws).unwrap();
    let before = ws.kept(&EmuStore).unwrap();
    let mut refused = |p: &Prompt<'_, EmuStore, f16>, budgets: Budgets<'_>, o: &SelectOptions, want: &str| {
        let e = compress(&EmuStore, p, budgets, o, &mut ws).map(|_| ()).unwrap_err();
        assert_eq!(field(e), want);
        assert_eq!(ws.kept(&EmuStore).unwrap(), before, "{want}: something ran");
    };
    let per_row = Budgets::PerRow(&good);

    refused(&p, Budgets::PerRow(&[3, 12]), &o, "budgets[0]");
    refused(&p, Budgets::PerRow(&[9, 0]), &o, "budgets[1]");
    refused(&p, Budgets::PerRow(&[9]), &o, "budgets");
    refused(&p, Budgets::PerRow(&[9, 9, 9]), &o, "budgets");
    for window in [0, q + 1] {
        refused(&p, per_row, &SelectOptions { window, ..o }, "window");
    }
    for pool_kernel in [0, 2, 6, q + 2, usize::MAX] {
        refused(&p, per_row, &SelectOptions { pool_kernel, ..o }, "pool_kernel");
    }
    for group_size in [0, 17] {
        refused(&Prompt { group_size, ..p }, per_row, &o, "group_size");
    }
    for head_dim in [96, 0, 32] {
        refused(&Prompt { head_dim, ..p }, per_row, &o, "head_dim");
    }
    refused(&Prompt { batch: 0, ..p }, per_row, &o, "batch");
    refused(&Prompt { kv_heads: 0, ..p }, per_row, &o, "kv_heads");
    refused(&Prompt { q_len: 0, ..p }, per_row, &o, "q_len");
    let (short, long) = (bufs(2, q - 1, d, 2 * g * w), bufs(2, q + 1, d, 2 * g * w + 1));
    refused(&Prompt { k: &short.k, ..p }, per_row, &o, "k");
    refused(&Prompt { v: &long.v, ..p }, per_row, &o, "v");
    refused(&Prompt { queries: &long.queries, ..p }, per_row, &o, "queries");
    // The queries hold exactly `window` rows per query head, so another window is a shape error
    // too when the window itself is valid.
    refused(&p, Budgets::PerRow(&[9, 12]), &SelectOptions { window: w + 1, ..o }, "queries");
    for scale in [0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3.0e38] {
        refused(&p, per_row, &SelectOptions { scale: Some(scale), ..o }, "scale");
    }
    refused(&p, per_row, &SelectOptions { chunk_tokens: Some(0), ..o }, "chunk_tokens");
    for floor_alpha in [f32::NAN, -0.1, 1.5, f32::INFINITY] {
        refused(&p, Budgets::AdaKv { base: 10, floor_alpha }, &o, "budgets.floor_alpha");
    }
    refused(&p, Budgets::AdaKv { base: w as u32 - 1, floor_alpha: 0.2 }, &o, "budgets.base");
    // The boundary values are accepted.
    for (budgets, opts) in [
        (Budgets::PerRow(&[4, 20]), o),
        (Budgets::AdaKv { base: 4, floor_alpha: 0.0 }, o),
        (Budgets::AdaKv { base: 40, floor_alpha: 1.0 }, SelectOptions { pool_kernel: 19, ..o }),
        (Budgets::PerRow(&[20, 25]), SelectOptions { window: q, pool_kernel: 1, ..o }),
    ] {
        let p = if opts.window == q {
            Prompt { queries: &bufs(2, q, d, 2 * g * q).queries, ..p }
        } else {
            Prompt { ..p }
        };
        compress(&EmuStore, &p, budgets, &opts, &mut SelectWorkspace::new()).unwrap();
    }
}

/// `compress_into`'s own errors: a destination of another head_dim, another segment count
/// (per KV head versus per query head included), or with a Streaming segment.
#[test]
fn compress_into_refuses_a_mismatched_destination() {
    let (q, d, g, w) = (30usize, 64usize, 2usize, 4usize);
    let b = bufs(2, q, d, 2 * g * w);
    let p = b.prompt(g, q, d);
    let o = SelectOptions { window: w, ..SelectOptions::default() };
    let budgets = [10u32; 4];
    let mut ws = SelectWorkspace::new();
    let into =
        |layout: LayerLayout, head_dim: usize, o: &SelectOptions, ws: &mut SelectWorkspace<EmuStore>| {
            let mut dest = LayerCache::<_, f16>::new(&EmuStore, layout, head_dim).unwrap();
            let rows = if o.granularity == Granularity::QueryHead { 4 } else { 2 };
            field(compress_into(&mut dest, &p, Budgets::PerRow(&budgets[..rows]), o, ws).unwrap_err())
        };
    let fits = |heads| {
        let mut lb = LayoutBuilder::new(1, heads).headroom(10);
        for h in 0..heads {
            lb = lb.full(0, h, 0);
        }
        lb.build().unwrap()
    };
    assert_eq!(into(fits(2), 128, &o, &mut ws), "dest.head_dim");
    assert_eq!(into(fits(3), d, &o, &mut ws), "dest.layout");
    assert_eq!(into(LayoutBuilder::new(2, 1).headroom(10).build().unwrap(), d, &o, &mut ws), "dest.layout");
    let per_qh = SelectOptions { granularity: Granularity::QueryHead, ..o };
    assert_eq!(into(fits(2), d, &per_qh, &mut ws), "dest.layout");
    let streaming =
        LayerLayout::new(1, 2, 40, vec![Segment::full(0, 10, 0), Segment::streaming(10, 4, 6)]).unwrap();
    assert_eq!(into(streaming, d, &o, &mut ws), "dest.segments[1].mode");
    assert!(ws.kept(&EmuStore).is_err(), "nothing may have run");
    // The same destinations, right-sized, are accepted.
    let mut dest = LayerCache::<_, f16>::new(&EmuStore, fits(4), d).unwrap();
    compress_into(&mut dest, &p, Budgets::PerRow(&budgets), &per_qh, &mut ws).unwrap();
    assert!(dest.layout().segments().iter().all(|s| s.len == 10));
}

#[test]
fn key_norm_and_given_scores_every_dtype_and_head_dim() {
    for d in headwise::dtype::SUPPORTED_HEAD_DIMS {
        common::select::key_norm_and_given_scores::<_, f16>(&EmuStore, d, 11 + d as u64);
        common::select::key_norm_and_given_scores::<_, bf16>(&EmuStore, d, 17 + d as u64);
    }
}

#[test]
fn sinks_and_threshold_keep_every_dtype_and_head_dim() {
    for d in headwise::dtype::SUPPORTED_HEAD_DIMS {
        common::select::sinks_and_threshold::<_, f16>(&EmuStore, d, 2, 23 + d as u64);
        common::select::sinks_and_threshold::<_, bf16>(&EmuStore, d, 2, 29 + d as u64);
    }
    // The other group sizes (per query head, a row per head: 1 .. 8 of them per KV head).
    for g in [1, 4, 8] {
        common::select::sinks_and_threshold::<_, bf16>(&EmuStore, 128, g, 31 + g as u64);
    }
}
