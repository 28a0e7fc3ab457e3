//! Prefill compression through the emulator against the f64 reference (see
//! common::select_scenario for what is checked).

mod common;

use common::{CaseBudgets, SelectCase, select_scenario};
use half::{bf16, f16};
use headwise::select::{GqaReduce, Granularity, Pool, SelectOptions};
use headwise::{EmuStore, KvElem};
use proptest::prelude::*;

fn cases() -> u32 {
    if std::env::var_os("HEADWISE_BIG_SWEEPS").is_some() { 64 } else { 8 }
}

fn opts(
    window: usize,
    pool_kernel: usize,
    pool: Pool,
    gqa: GqaReduce,
    granularity: Granularity,
) -> SelectOptions {
    SelectOptions { window, pool_kernel, pool, gqa, granularity, ..SelectOptions::default() }
}

fn case_strategy() -> impl Strategy<Value = SelectCase> {
    (
        1usize..3,
        1usize..3,
        prop::sample::select(vec![1usize, 2, 3, 4, 8]),
        prop::sample::select(vec![64usize, 128, 256]),
        1usize..12,
        0usize..150,
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
                    q,
                    head_dim,
                    opts: SelectOptions {
                        chunk_tokens: chunk,
                        ..opts(
                            window,
                            kernel,
                            if avg { Pool::Avg } else { Pool::Max },
                            if max { GqaReduce::Max } else { GqaReduce::Mean },
                            if per_qh { Granularity::QueryHead } else { Granularity::KvHead },
                        )
                    },
                    budgets,
                    seed,
                })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn emulator_matches_reference_f16(case in case_strategy()) {
        select_scenario::<_, f16>(&EmuStore, &case);
    }

    #[test]
    fn emulator_matches_reference_bf16(case in case_strategy()) {
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
