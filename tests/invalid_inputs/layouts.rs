//! Layout validation: `LayerLayout::new`, `LayoutBuilder`, `LayerLayout::regrown`, and the
//! valid-table generator and one-fault mutations the cache and C ABI entries reuse. Part of
//! tests/invalid_inputs.rs.

use super::*;

/// A valid segment table: segments packed in index order with small gaps, Full and Streaming
/// (some with a wrapped ring), some of capacity 0.
#[derive(Clone, Debug)]
pub(super) struct Table {
    pub(super) batch: usize,
    pub(super) kv_heads: usize,
    pub(super) total_rows: u64,
    pub(super) segs: Vec<Segment>,
}

pub(super) fn end(s: &Segment) -> u64 {
    u64::from(s.offset) + u64::from(s.capacity)
}

pub(super) fn table() -> impl Strategy<Value = Table> {
    (1usize..=3, 1usize..=3)
        .prop_flat_map(|(batch, kv_heads)| {
            let spec = (0u8..3, 0u32..6, 0u32..6, 0u32..3, any::<u32>());
            (Just(batch), Just(kv_heads), prop::collection::vec(spec, batch * kv_heads), 0u64..3)
        })
        .prop_map(|(batch, kv_heads, specs, extra)| {
            let mut off = 0u32;
            let mut segs = Vec::new();
            for (kind, a, b, gap, r) in specs {
                off += gap;
                let s = if kind < 2 {
                    Segment::full(off, a + b, a)
                } else {
                    let (sink, window) = (a % 4, b + 1);
                    let len = r % (sink + window + 1);
                    let ring_head = if len == sink + window { (r / 7) % window } else { 0 };
                    Segment { len, ring_head, ..Segment::streaming(off, sink, window) }
                };
                off += s.capacity;
                segs.push(s);
            }
            Table { batch, kv_heads, total_rows: u64::from(off) + extra, segs }
        })
}

#[derive(Clone, Debug)]
pub(super) enum LayoutFault {
    None,
    SegmentCount(bool),
    BatchZero,
    KvHeadsZero,
    TotalRowsAboveInt32(u64),
    PastTheEnd(usize, u32),
    OffsetNearU32Max(usize, u32),
    LenAboveCapacity(usize, u32),
    FullRingHead(usize, u32),
    WindowZero(usize),
    SinkPlusWindowMismatch(usize, u32),
    RingHeadOutOfRange(usize, u32),
    Overlap(usize, usize, u32),
    EndsAtInt32Max,
    PastInt32Max(u32),
}

pub(super) fn layout_fault() -> impl Strategy<Value = LayoutFault> {
    let i = 0usize..9;
    let x = any::<u32>();
    prop_oneof![
        Just(LayoutFault::None),
        any::<bool>().prop_map(LayoutFault::SegmentCount),
        Just(LayoutFault::BatchZero),
        Just(LayoutFault::KvHeadsZero),
        (0u64..1 << 40).prop_map(LayoutFault::TotalRowsAboveInt32),
        (i.clone(), x).prop_map(|(i, x)| LayoutFault::PastTheEnd(i, x)),
        (i.clone(), 0u32..64).prop_map(|(i, x)| LayoutFault::OffsetNearU32Max(i, x)),
        (i.clone(), x).prop_map(|(i, x)| LayoutFault::LenAboveCapacity(i, x)),
        (i.clone(), x).prop_map(|(i, x)| LayoutFault::FullRingHead(i, x)),
        i.clone().prop_map(LayoutFault::WindowZero),
        (i.clone(), 0u32..1000).prop_map(|(i, x)| LayoutFault::SinkPlusWindowMismatch(i, x)),
        (i.clone(), x).prop_map(|(i, x)| LayoutFault::RingHeadOutOfRange(i, x)),
        (i.clone(), i, x).prop_map(|(i, j, x)| LayoutFault::Overlap(i, j, x)),
        Just(LayoutFault::EndsAtInt32Max),
        x.prop_map(LayoutFault::PastInt32Max),
    ]
}

/// The first segment at or after `i` (cyclically) that satisfies `pred`.
pub(super) fn pick(segs: &[Segment], i: usize, pred: impl Fn(&Segment) -> bool) -> Option<usize> {
    (0..segs.len()).map(|k| (i + k) % segs.len()).find(|&k| pred(&segs[k]))
}

pub(super) fn overlaps(a: &Segment, b: &Segment) -> bool {
    a.capacity > 0 && b.capacity > 0 && u64::from(a.offset) < end(b) && u64::from(b.offset) < end(a)
}

/// Breaks `t` in the one way `fault` says and returns what `LayerLayout::new` must report. A
/// fault that needs a kind of segment the table lacks becomes `len > capacity` on segment `i`.
pub(super) fn apply(t: &mut Table, fault: &LayoutFault) -> Expect {
    let n = t.segs.len();
    let seg = |i: usize, f: &str| invalid(format!("segments[{i}].{f}"));
    let len_fault = |t: &mut Table, i: usize, x: u32| {
        let s = &mut t.segs[i % n];
        s.len = s.capacity.saturating_add(1).saturating_add(x % 1000);
        seg(i % n, "len")
    };
    match *fault {
        LayoutFault::None => Expect::Ok,
        LayoutFault::SegmentCount(add) => {
            if add {
                t.segs.push(Segment::full(0, 0, 0));
            } else {
                t.segs.pop();
            }
            invalid("segments")
        }
        LayoutFault::BatchZero => {
            t.batch = 0;
            invalid("batch")
        }
        LayoutFault::KvHeadsZero => {
            t.kv_heads = 0;
            invalid("kv_heads")
        }
        LayoutFault::TotalRowsAboveInt32(x) => {
            t.total_rows = MAX_ROWS + 1 + x;
            invalid("total_rows")
        }
        LayoutFault::PastTheEnd(i, x) => match pick(&t.segs, i, |s| s.capacity > 0) {
            Some(k) => {
                let s = &mut t.segs[k];
                let beyond = 1 + u64::from(x) % 3;
                s.offset = (t.total_rows + beyond - u64::from(s.capacity)) as u32;
                seg(k, "capacity")
            }
            None => len_fault(t, i, x),
        },
        LayoutFault::OffsetNearU32Max(i, x) => {
            let s = &mut t.segs[i % n];
            s.offset = u32::MAX - x;
            s.capacity = s.capacity.max(x + 1);
            s.len = 0;
            s.ring_head = 0;
            if let SegmentMode::Streaming { .. } = s.mode {
                s.mode = SegmentMode::Streaming { sink: s.capacity - 1, window: 1 };
            }
            seg(i % n, "capacity")
        }
        LayoutFault::LenAboveCapacity(i, x) => len_fault(t, i, x),
        LayoutFault::FullRingHead(i, x) => match pick(&t.segs, i, |s| s.mode == SegmentMode::Full) {
            Some(k) => {
                t.segs[k].ring_head = x.max(1);
                seg(k, "ring_head")
            }
            None => len_fault(t, i, x),
        },
        LayoutFault::WindowZero(i) => {
            match pick(&t.segs, i, |s| matches!(s.mode, SegmentMode::Streaming { .. })) {
                Some(k) => {
                    let s = &mut t.segs[k];
                    s.mode = SegmentMode::Streaming { sink: s.capacity, window: 0 };
                    s.ring_head = 0;
                    seg(k, "mode.window")
                }
                None => len_fault(t, i, 0),
            }
        }
        LayoutFault::SinkPlusWindowMismatch(i, x) => {
            match pick(&t.segs, i, |s| matches!(s.mode, SegmentMode::Streaming { .. })) {
                Some(k) => {
                    let s = &mut t.segs[k];
                    if let SegmentMode::Streaming { sink, window } = s.mode {
                        s.mode = SegmentMode::Streaming { sink: sink + 1 + x, window };
                    }
                    seg(k, "capacity")
                }
                None => len_fault(t, i, x),
            }
        }
        LayoutFault::RingHeadOutOfRange(i, x) => {
            match pick(&t.segs, i, |s| matches!(s.mode, SegmentMode::Streaming { .. })) {
                Some(k) => {
                    let s = &mut t.segs[k];
                    let SegmentMode::Streaming { sink, window } = s.mode else { unreachable!() };
                    // A ring holding tokens: beyond the window; an empty ring: anything but 0.
                    s.ring_head = if s.len > sink { window.saturating_add(x % 1000) } else { x.max(1) };
                    seg(k, "ring_head")
                }
                None => len_fault(t, i, x),
            }
        }
        LayoutFault::Overlap(i, j, x) => {
            let Some(a) = pick(&t.segs, i, |s| s.capacity > 0) else { return len_fault(t, i, x) };
            let Some(b) = pick(&t.segs, j, |s| s.capacity > 0).filter(|&b| b != a) else {
                return len_fault(t, i, x);
            };
            let start = t.segs[a].offset + x % t.segs[a].capacity;
            t.segs[b].offset = start;
            t.total_rows = t.total_rows.max(end(&t.segs[b]));
            let segs = t.segs.clone();
            // Which of the overlapping segments is reported depends on the sort order; any one
            // that really overlaps another is right.
            Expect::InvalidWhere(
                "the named segment overlaps another",
                Rc::new(move |field| {
                    let k = field.strip_prefix("segments[").and_then(|r| r.strip_suffix(']'));
                    k.and_then(|k| k.parse::<usize>().ok()).is_some_and(|k| {
                        k < segs.len() && (0..segs.len()).any(|o| o != k && overlaps(&segs[k], &segs[o]))
                    })
                }),
            )
        }
        LayoutFault::EndsAtInt32Max | LayoutFault::PastInt32Max(_) => {
            // Shift the table so it ends exactly at the last row int32 metadata can address.
            let top = t.segs.iter().map(end).max().unwrap_or(0);
            let shift = (MAX_ROWS - top) as u32;
            for s in &mut t.segs {
                s.offset += shift;
            }
            t.total_rows = MAX_ROWS;
            let LayoutFault::PastInt32Max(x) = *fault else { return Expect::Ok };
            match pick(&t.segs, 0, |s| end(s) == MAX_ROWS && s.mode == SegmentMode::Full) {
                Some(k) => {
                    t.segs[k].capacity += 1 + x % 1000;
                    seg(k, "capacity")
                }
                None => len_fault(t, 0, x),
            }
        }
    }
}

pub(super) fn layout_new(b: &mut Battery) {
    b.run("LayerLayout::new", 30_000, (table(), layout_fault()), |p, (mut t, fault)| {
        let expect = apply(&mut t, &fault);
        let Table { batch, kv_heads, total_rows, segs } = t.clone();
        let ok = matches!(expect, Expect::Ok);
        if let Some(l) = p.call(expect, || LayerLayout::new(batch, kv_heads, total_rows, segs))? {
            check(ok && l.segments() == &t.segs[..] && l.total_rows() as u64 == t.total_rows, || {
                format!("accepted layout differs from its table: {l:?}")
            })?;
        }
        Ok(())
    });
}

#[derive(Clone, Debug)]
pub(super) enum BuilderFault {
    None,
    OutsideGrid(usize, usize),
    WindowZero(usize),
    HugeLen(usize, u32),
    HugeSink(usize, u32),
    HugeHeadroom(u32),
    TooManySegments(usize, usize),
    BatchZero,
    KvHeadsZero,
}

pub(super) fn builder_fault() -> impl Strategy<Value = BuilderFault> {
    prop_oneof![
        Just(BuilderFault::None),
        (0usize..20, 0usize..20).prop_map(|(b, h)| BuilderFault::OutsideGrid(b, h)),
        (0usize..9).prop_map(BuilderFault::WindowZero),
        (0usize..9, 0u32..16).prop_map(|(i, x)| BuilderFault::HugeLen(i, x)),
        (0usize..9, 0u32..16).prop_map(|(i, x)| BuilderFault::HugeSink(i, x)),
        (0u32..16).prop_map(BuilderFault::HugeHeadroom),
        prop_oneof![
            (MAX_BUILDER_SEGMENTS + 1..usize::MAX).prop_map(|n| (n, 1)),
            (1usize << 13..1 << 20, 1usize << 12..1 << 20).prop_map(|(b, h)| (b, h)),
            (2usize..64).prop_map(|h| (usize::MAX / 2 + 1, h)),
        ]
        .prop_map(|(b, h)| BuilderFault::TooManySegments(b, h)),
        Just(BuilderFault::BatchZero),
        Just(BuilderFault::KvHeadsZero),
    ]
}

pub(super) fn layout_builder(b: &mut Battery) {
    let specs = prop::collection::vec((any::<bool>(), 0u32..10, 0u32..4, 1u32..6), 1..=9);
    b.run(
        "LayoutBuilder::build",
        15_000,
        (1usize..=3, specs, 0u32..8, builder_fault()),
        |p, (batch, specs, headroom, fault)| {
            // Specs fill slot after slot of a batch x kv_heads grid.
            let kv_heads = specs.len().div_ceil(batch);
            let (mut batch, mut kv_heads, mut headroom) = (batch, kv_heads, headroom);
            let mut ops: Vec<(usize, usize, SegmentMode, u32)> = specs
                .iter()
                .enumerate()
                .map(|(i, &(streaming, len, sink, window))| {
                    let mode =
                        if streaming { SegmentMode::Streaming { sink, window } } else { SegmentMode::Full };
                    (i / kv_heads, i % kv_heads, mode, len)
                })
                .collect();
            let n = batch * kv_heads;
            let slot_of = |i: usize| i % n;
            let expect = match fault {
                BuilderFault::None => Expect::Ok,
                BuilderFault::OutsideGrid(b, h) => {
                    let (b, h) =
                        if b % 2 == 0 { (batch + b, h % kv_heads) } else { (b % batch, kv_heads + h) };
                    ops.push((b, h, SegmentMode::Full, 1));
                    invalid("segment")
                }
                BuilderFault::WindowZero(i) => {
                    let s = slot_of(i);
                    ops.push((s / kv_heads, s % kv_heads, SegmentMode::Streaming { sink: 1, window: 0 }, 0));
                    invalid(format!("segments[{s}].mode.window"))
                }
                BuilderFault::HugeLen(i, x) => {
                    let s = slot_of(i);
                    ops.push((s / kv_heads, s % kv_heads, SegmentMode::Full, u32::MAX - x));
                    builder_overflow_at(&ops, batch, kv_heads, headroom)
                }
                BuilderFault::HugeSink(i, x) => {
                    let s = slot_of(i);
                    let mode = SegmentMode::Streaming { sink: (MAX_ROWS as u32) - x, window: 1 + x * 2 };
                    ops.push((s / kv_heads, s % kv_heads, mode, 0));
                    builder_overflow_at(&ops, batch, kv_heads, headroom)
                }
                BuilderFault::HugeHeadroom(x) => {
                    headroom = u32::MAX - x;
                    builder_overflow_at(&ops, batch, kv_heads, headroom)
                }
                BuilderFault::TooManySegments(b, h) => {
                    (batch, kv_heads) = (b, h);
                    invalid("batch * kv_heads")
                }
                BuilderFault::BatchZero => {
                    (batch, ops) = (0, vec![]);
                    invalid("batch")
                }
                BuilderFault::KvHeadsZero => {
                    (kv_heads, ops) = (0, vec![]);
                    invalid("kv_heads")
                }
            };
            let ok = matches!(expect, Expect::Ok);
            let built = p.call(expect, || {
                let mut lb = LayoutBuilder::new(batch, kv_heads).headroom(headroom);
                for &(b, h, mode, len) in &ops {
                    lb = match mode {
                        SegmentMode::Full => lb.full(b, h, len),
                        SegmentMode::Streaming { sink, window } => lb.streaming(b, h, sink, window),
                    };
                }
                lb.build()
            })?;
            if let Some(l) = built {
                let total: u64 = l.segments().iter().map(|s| u64::from(s.capacity)).sum();
                check(ok && l.total_rows() as u64 == total && l.segments().len() == n, || format!("{l:?}"))?;
            }
            Ok(())
        },
    );
}

/// The error a packed build must report when its rows overflow: the first segment whose
/// prefix sum of capacities passes `MAX_ROWS` (the last op for a slot wins).
pub(super) fn builder_overflow_at(
    ops: &[(usize, usize, SegmentMode, u32)],
    batch: usize,
    kv_heads: usize,
    headroom: u32,
) -> Expect {
    let mut slots = vec![(SegmentMode::Full, 0u32); batch * kv_heads];
    for &(b, h, mode, len) in ops {
        slots[b * kv_heads + h] = (mode, len);
    }
    let mut total = 0u64;
    for (i, &(mode, len)) in slots.iter().enumerate() {
        total += match mode {
            SegmentMode::Full => u64::from(len) + u64::from(headroom),
            SegmentMode::Streaming { sink, window } => u64::from(sink) + u64::from(window),
        };
        if total > MAX_ROWS {
            return invalid(format!("segments[{i}]"));
        }
    }
    Expect::Ok
}

pub(super) fn layout_regrown(b: &mut Battery) {
    let headroom = prop_oneof![
        0u32..64,
        (0u32..1 << 20).prop_map(|x| u32::MAX - x),
        (-4i64..4).prop_map(|d| {
            // Around the largest headroom a one-Full-segment table can take.
            (MAX_ROWS as i64 - 64 + d) as u32
        })
    ];
    b.run("LayerLayout::regrown", 5_000, (table(), headroom), |p, (t, headroom)| {
        let layout = LayerLayout::new(t.batch, t.kv_heads, t.total_rows, t.segs).unwrap();
        let want: u64 = layout
            .segments()
            .iter()
            .map(|s| match s.mode {
                SegmentMode::Full => u64::from(s.len) + u64::from(headroom),
                SegmentMode::Streaming { .. } => u64::from(s.capacity),
            })
            .sum();
        let expect = if want > MAX_ROWS { invalid("headroom") } else { Expect::Ok };
        if let Some(g) = p.call(expect, || layout.regrown(headroom))? {
            check(g.total_rows() as u64 == want, || {
                format!("regrown to {} rows, want {want}", g.total_rows())
            })?;
        }
        Ok(())
    });
}
