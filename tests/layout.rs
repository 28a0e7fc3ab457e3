//! Host-side layout validation against a brute-force oracle, and the builder/regrow invariants.

use headwise::Error;
use headwise::layout::{LayerLayout, LayoutBuilder, MAX_ROWS, Segment, SegmentMode};
use proptest::prelude::*;

/// Whether a segment table is valid, decided the slow and obvious way: mark every row.
fn oracle_valid(total_rows: u64, segs: &[Segment]) -> bool {
    if total_rows > 4096 {
        return false; // the strategy below never asks for more; keeps the oracle simple
    }
    let mut owner = vec![usize::MAX; total_rows as usize];
    for (i, s) in segs.iter().enumerate() {
        // Even an empty segment must sit inside the buffer (its offset is device metadata).
        if s.len > s.capacity || s.offset as u64 + s.capacity as u64 > total_rows {
            return false;
        }
        match s.mode {
            SegmentMode::Full if s.ring_head != 0 => return false,
            SegmentMode::Streaming { sink, window } => {
                if window == 0 || sink as u64 + window as u64 != s.capacity as u64 {
                    return false;
                }
                // An empty ring starts at slot 0; a ring holding tokens may start anywhere
                // (not full with ring_head != 0 after a rollback).
                if s.ring_head >= window || (s.len <= sink && s.ring_head != 0) {
                    return false;
                }
            }
            _ => {}
        }
        for r in s.offset as u64..s.offset as u64 + s.capacity as u64 {
            if r >= total_rows || owner[r as usize] != usize::MAX {
                return false;
            }
            owner[r as usize] = i;
        }
    }
    true
}

fn any_segment() -> impl Strategy<Value = Segment> {
    (0u32..40, 0u32..12, 0u32..14, 0u32..4, prop::bool::ANY, 0u32..5, 0u32..6).prop_map(
        |(offset, capacity, len, ring_head, streaming, sink, window)| {
            if streaming {
                Segment { offset, capacity, len, ring_head, mode: SegmentMode::Streaming { sink, window } }
            } else {
                Segment {
                    offset,
                    capacity,
                    len,
                    ring_head: if ring_head == 3 { 1 } else { 0 },
                    mode: SegmentMode::Full,
                }
            }
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn validation_agrees_with_row_marking(
        segs in proptest::collection::vec(any_segment(), 1..6),
        total_rows in 0u64..60,
    ) {
        let n = segs.len();
        let got = LayerLayout::new(1, n, total_rows, segs.clone());
        prop_assert_eq!(got.is_ok(), oracle_valid(total_rows, &segs), "{:?}", got);
        if let Err(e) = got {
            prop_assert!(matches!(e, Error::Invalid { .. }), "{}", e);
        }
    }

    #[test]
    fn builder_packs_and_regrow_keeps_contents(
        specs in proptest::collection::vec((prop::bool::ANY, 0u32..20, 0u32..5, 1u32..9), 1..9),
        headroom in 0u32..10,
        regrow in 0u32..10,
    ) {
        let n = specs.len();
        let mut b = LayoutBuilder::new(1, n).headroom(headroom);
        for (h, &(streaming, len, sink, window)) in specs.iter().enumerate() {
            b = if streaming { b.streaming(0, h, sink, window) } else { b.full(0, h, len) };
        }
        let layout = b.build().unwrap();
        let mut next = 0u32;
        for (h, s) in layout.segments().iter().enumerate() {
            prop_assert_eq!(s.offset, next, "packed in segment order");
            next += s.capacity;
            let (streaming, len, sink, window) = specs[h];
            if streaming {
                prop_assert_eq!(s.mode, SegmentMode::Streaming { sink, window });
                prop_assert_eq!((s.len, s.capacity), (0, sink + window));
            } else {
                prop_assert_eq!((s.len, s.capacity), (len, len + headroom));
            }
        }
        prop_assert_eq!(layout.total_rows() as u32, next);
        let grown = layout.regrown(regrow).unwrap();
        for (a, b) in layout.segments().iter().zip(grown.segments()) {
            prop_assert_eq!((a.mode, a.len, a.ring_head), (b.mode, b.len, b.ring_head));
            let want = if a.mode == SegmentMode::Full { a.len + regrow } else { a.capacity };
            prop_assert_eq!(b.capacity, want);
        }
    }
}

#[test]
fn errors_name_the_field_and_bound() {
    let cases: Vec<(u64, Vec<Segment>, &str)> = vec![
        (10, vec![Segment::full(8, 4, 0)], "segments[0].capacity"),
        (10, vec![Segment::full(0, 4, 5)], "segments[0].len"),
        (10, vec![Segment::full(0, 4, 0), Segment::full(3, 4, 0)], "segments[1]"),
        (10, vec![Segment::streaming(0, 2, 0)], "segments[0].mode.window"),
        (
            10,
            vec![Segment {
                offset: 0,
                capacity: 5,
                len: 0,
                ring_head: 0,
                mode: SegmentMode::Streaming { sink: 2, window: 2 },
            }],
            "segments[0].capacity",
        ),
        (
            10,
            vec![Segment {
                offset: 0,
                capacity: 4,
                len: 2,
                ring_head: 1,
                mode: SegmentMode::Streaming { sink: 2, window: 2 },
            }],
            "segments[0].ring_head",
        ),
        (MAX_ROWS + 1, vec![Segment::full(0, 1, 0)], "total_rows"),
    ];
    for (rows, segs, field) in cases {
        let n = segs.len();
        match LayerLayout::new(1, n, rows, segs) {
            Err(Error::Invalid { field: f, reason }) => {
                assert_eq!(f, field, "{reason}");
                assert!(!reason.is_empty());
            }
            other => panic!("expected an error naming {field}, got {other:?}"),
        }
    }
    assert!(
        matches!(LayerLayout::new(0, 1, 0, vec![]), Err(Error::Invalid { field, .. }) if field == "batch")
    );
    assert!(
        matches!(LayerLayout::new(1, 0, 0, vec![]), Err(Error::Invalid { field, .. }) if field == "kv_heads")
    );
    assert!(
        matches!(LayerLayout::new(2, 2, 0, vec![]), Err(Error::Invalid { field, .. }) if field == "segments")
    );
}

#[test]
fn rows_near_the_int32_limit() {
    // The last row the device can address is fine; one past it is an error, not a wrap.
    let top = (MAX_ROWS - 4) as u32;
    assert!(LayerLayout::new(1, 1, MAX_ROWS, vec![Segment::full(top, 4, 4)]).is_ok());
    assert!(LayerLayout::new(1, 1, MAX_ROWS, vec![Segment::full(top, 5, 0)]).is_err());
    let huge = LayerLayout::new(1, 1, MAX_ROWS, vec![Segment::full(0, MAX_ROWS as u32, 0)]).unwrap();
    assert!(huge.regrown(1).is_ok(), "len 0 + headroom 1 fits");
    let full =
        LayerLayout::new(1, 1, MAX_ROWS, vec![Segment::full(0, MAX_ROWS as u32, MAX_ROWS as u32)]).unwrap();
    assert!(matches!(full.regrown(1), Err(Error::Invalid { field, .. }) if field == "headroom"));
    assert!(LayoutBuilder::new(1, 2).full(0, 0, u32::MAX).build().is_err());
    // More segments than the builder can hold: an error from build(), no panic before it.
    let huge =
        LayoutBuilder::new(1 << 14, 1 << 14).full((1 << 14) - 1, (1 << 14) - 1, 1).streaming(9999, 3, 1, 1);
    assert!(matches!(huge.build(), Err(Error::Invalid { field, .. }) if field == "batch * kv_heads"));
    let outside = LayoutBuilder::new(2, 2).full(2, 0, 1);
    assert!(matches!(outside.build(), Err(Error::Invalid { field, .. }) if field == "segment"));
    let outside = LayoutBuilder::new(2, 2).streaming(0, 2, 1, 1);
    assert!(matches!(outside.build(), Err(Error::Invalid { field, .. }) if field == "segment"));
}

#[test]
fn device_table_encoding() {
    let layout = LayerLayout::new(
        1,
        2,
        20,
        vec![
            Segment::full(10, 6, 2),
            Segment {
                offset: 0,
                capacity: 5,
                len: 5,
                ring_head: 2,
                mode: SegmentMode::Streaming { sink: 1, window: 4 },
            },
        ],
    )
    .unwrap();
    assert_eq!(layout.device_table(), vec![10, 0, 6, 5, 2, 5, 0, 1, 0, 2, 0, 1]);
    // Streaming rows: sink first, then the ring from ring_head, oldest first.
    let s = layout.segments()[1];
    assert_eq!((0..5).map(|i| s.row(i)).collect::<Vec<_>>(), vec![0, 3, 4, 1, 2]);
    assert_eq!(s.append_row(), Some(3));
    assert_eq!(layout.segments()[0].append_row(), Some(12));
}
