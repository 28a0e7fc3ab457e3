//! Append through the emulator against the CPU reference (see common::append_scenario for what
//! is checked after every step).
#![cfg(feature = "emulator")]

mod common;

use common::{SegSpec, append_scenario, build_layout, seg_spec};
use half::{bf16, f16};
use headwise::layout::{LayerLayout, LayoutBuilder, Segment};
use headwise::{EmuStore, Error, LayerCache, Store};
use proptest::prelude::*;

fn cases() -> u32 {
    // Big randomized sweeps only when asked for (CI sets HEADWISE_BIG_SWEEPS).
    if std::env::var_os("HEADWISE_BIG_SWEEPS").is_some() { 256 } else { 32 }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn emulator_matches_reference_f16(
        (batch, kv_heads, specs, gaps) in (1usize..4, 1usize..4).prop_flat_map(|(b, h)| {
            (Just(b), Just(h), proptest::collection::vec(seg_spec(), b * h), proptest::collection::vec(0u32..3, b * h))
        }),
        head_dim in prop::sample::select(vec![64usize, 128, 256]),
        steps in 0usize..16,
        regrow in 1u32..4,
        seed in any::<u64>(),
    ) {
        let layout = build_layout(batch, kv_heads, &specs, &gaps);
        append_scenario::<_, f16>(&EmuStore, layout, head_dim, steps, regrow, seed);
    }

    #[test]
    fn emulator_matches_reference_bf16(
        (batch, kv_heads, specs, gaps) in (1usize..4, 1usize..4).prop_flat_map(|(b, h)| {
            (Just(b), Just(h), proptest::collection::vec(seg_spec(), b * h), proptest::collection::vec(0u32..3, b * h))
        }),
        head_dim in prop::sample::select(vec![64usize, 128, 256]),
        steps in 0usize..16,
        regrow in 1u32..4,
        seed in any::<u64>(),
    ) {
        let layout = build_layout(batch, kv_heads, &specs, &gaps);
        append_scenario::<_, bf16>(&EmuStore, layout, head_dim, steps, regrow, seed);
    }
}

/// Many wraparounds of small rings, next to a Full segment that fills up and regrows, and an
/// empty sink (pure window) segment, at every head_dim.
#[test]
fn ring_wraps_many_times() {
    for head_dim in [64, 128, 256] {
        let specs = [
            SegSpec::Streaming { sink: 2, window: 3 },
            SegSpec::Streaming { sink: 0, window: 1 },
            SegSpec::Full { len: 0, headroom: 0 },
            SegSpec::Streaming { sink: 4, window: 7 },
        ];
        let layout = build_layout(2, 2, &specs, &[0, 1, 0, 2]);
        append_scenario::<_, bf16>(&EmuStore, layout, head_dim, 60, 5, 7 + head_dim as u64);
    }
}

/// More segments than one block holds (4 per block), with the last block partly filled.
#[test]
fn many_segments_partial_last_block() {
    let b = LayoutBuilder::new(5, 7).headroom(3);
    let b = (0..5).fold(b, |b, s| b.streaming(s, s % 7, 1, 2).full(s, (s + 3) % 7, 2));
    append_scenario::<_, f16>(&EmuStore, b.build().unwrap(), 128, 9, 2, 99);
}

#[test]
fn full_segment_of_capacity_zero_fails_before_launch() {
    let layout = LayerLayout::new(1, 2, 4, vec![Segment::full(0, 0, 0), Segment::full(0, 4, 1)]).unwrap();
    let mut cache = LayerCache::<_, f16>::new(&EmuStore, layout.clone(), 64).unwrap();
    let new = EmuStore.zeros::<f16>(2 * 64).unwrap();
    match cache.append(&new, &new) {
        Err(Error::SegmentFull { segment: 0, capacity: 0 }) => {}
        other => panic!("expected SegmentFull for segment 0, got {other:?}"),
    }
    assert_eq!(cache.layout(), &layout, "a failed append must not change the layout");
}

#[test]
fn bad_shapes_are_errors_naming_the_field() {
    let layout = LayoutBuilder::new(2, 2).headroom(4).build().unwrap();
    let mut cache = LayerCache::<_, bf16>::new(&EmuStore, layout.clone(), 128).unwrap();
    let good = EmuStore.zeros::<bf16>(4 * 128).unwrap();
    let short = EmuStore.zeros::<bf16>(4 * 128 - 1).unwrap();
    let e = cache.append(&short, &good).unwrap_err();
    assert!(matches!(&e, Error::Invalid { field, .. } if field == "k_new"), "{e}");
    let e = cache.append(&good, &short).unwrap_err();
    assert!(matches!(&e, Error::Invalid { field, .. } if field == "v_new"), "{e}");
    for bad in [0, 32, 96, 100, 512] {
        let e =
            LayerCache::<_, bf16>::new(&EmuStore, layout.clone(), bad).err().expect("unsupported head_dim");
        assert!(matches!(&e, Error::Invalid { field, .. } if field == "head_dim"), "{e}");
    }
    let wrong = EmuStore.zeros::<bf16>(layout.total_rows() * 128 + 8).unwrap();
    let e =
        LayerCache::<_, bf16>::from_parts(&EmuStore, layout.clone(), 128, wrong, EmuStore.zeros(0).unwrap())
            .err()
            .expect("wrong k length");
    assert!(matches!(&e, Error::Invalid { field, .. } if field == "k"), "{e}");
}

#[test]
fn relayout_into_rejects_a_target_that_changes_segments() {
    let layout = LayoutBuilder::new(1, 2).full(0, 0, 3).headroom(2).build().unwrap();
    let cache = LayerCache::<_, f16>::new(&EmuStore, layout.clone(), 64).unwrap();
    let shrunk = LayoutBuilder::new(1, 2).full(0, 0, 2).build().unwrap();
    let mut k = EmuStore.zeros::<f16>(shrunk.total_rows() * 64).unwrap();
    let mut v = EmuStore.zeros::<f16>(shrunk.total_rows() * 64).unwrap();
    let e = cache.relayout_into(&shrunk, &mut k, &mut v).unwrap_err();
    assert!(matches!(&e, Error::Invalid { field, .. } if field.starts_with("target.segments[0]")), "{e}");
}
