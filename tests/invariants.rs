//! The "nothing lost" debug checks: they accept correct compactions (prefill selection, R-KV,
//! regrow, all run here with the checks on) and reject each kind of broken result.
#![cfg(feature = "emulator")]

mod common;

use common::{CaseBudgets, RkvCase, SelectCase, rkv_scenario, select_scenario};
use half::{bf16, f16};
use headwise::invariants::{check_rows, check_selection, set_enabled};
use headwise::redundancy::RkvOptions;
use headwise::select::{Granularity, SelectOptions};
use headwise::{EmuStore, Error, LayerCache, LayoutBuilder, Store};

fn violated(r: headwise::Result<()>) -> String {
    match r {
        Err(Error::Invariant { detail, .. }) => detail,
        other => panic!("expected an invariant violation, got {other:?}"),
    }
}

#[test]
fn selection_check_rejects_each_broken_property() {
    // len 10, window 2, budget 5: three prefix tokens + 8, 9.
    assert!(check_selection("t", "row", &[0, 3, 5, 8, 9], 10, 2, 5).is_ok());
    assert!(check_selection("t", "row", &[0, 1, 2], 3, 2, 5).is_ok()); // budget >= len keeps all
    assert!(violated(check_selection("t", "row", &[0, 3, 8, 9], 10, 2, 5)).contains("positions kept"));
    assert!(violated(check_selection("t", "row", &[3, 0, 5, 8, 9], 10, 2, 5)).contains("ascending"));
    assert!(violated(check_selection("t", "row", &[0, 3, 5, 7, 9], 10, 2, 5)).contains("window"));
    assert!(violated(check_selection("t", "row", &[0, 3, 5, 9, 10], 10, 2, 5)).contains("past len"));
}

#[test]
fn row_check_rejects_a_changed_byte() {
    let src: Vec<u16> = (0..12).collect(); // 4 rows of 3
    let mut dst = vec![9u16, 10, 11, 3, 4, 5];
    assert!(check_rows("t", "seg", &src, &dst, &[(3, 0), (1, 1)], 3).is_ok());
    dst[4] ^= 1;
    assert!(violated(check_rows("t", "seg", &src, &dst, &[(3, 0), (1, 1)], 3)).contains("row 1"));
}

#[test]
fn checked_operations_pass_on_correct_results() {
    set_enabled(true);
    // Prefill selection, both granularities and AdaKV.
    for (granularity, budgets) in [
        (Granularity::KvHead, CaseBudgets::PerRow(vec![20, 45])),
        (Granularity::QueryHead, CaseBudgets::AdaKv { base: 30, floor_alpha: 0.2 }),
    ] {
        let case = SelectCase {
            batch: 1,
            kv_heads: 2,
            group: 2,
            q: 90,
            head_dim: 64,
            opts: SelectOptions { window: 8, granularity, ..SelectOptions::default() },
            budgets,
            seed: 5,
        };
        select_scenario::<_, f16>(&EmuStore, &case);
    }
    // R-KV.
    let case = RkvCase {
        batch: 1,
        kv_heads: 2,
        group: 2,
        head_dim: 64,
        segs: vec![Ok(120), Err((2, 5))],
        opts: RkvOptions { buffer: 16, ..RkvOptions::new(40) },
        pushes: 3,
        forced: None,
        duplicates: vec![],
        seed: 9,
    };
    rkv_scenario::<_, bf16>(&EmuStore, &case);
    // Regrow of a layout with a wrapped ring.
    let layout = LayoutBuilder::new(1, 2).full(0, 0, 3).streaming(0, 1, 1, 2).build().unwrap();
    let mut cache = LayerCache::<_, f16>::new(&EmuStore, layout, 64).unwrap();
    for i in 0..5 {
        let t = EmuStore.upload(&vec![f16::from_f32(i as f32); 2 * 64]).unwrap();
        if cache.append(&t, &t).is_err() {
            cache.regrow(4).unwrap();
            cache.append(&t, &t).unwrap();
        }
    }
    cache.regrow(8).unwrap();
}
