//! Layout validation: `LayerLayout::new` accepts exactly the tables an independent check calls
//! valid (and every error names a field that really is at fault), `LayoutBuilder::build` likewise,
//! and every accepted layout keeps its promises (rows inside the segment, device table equal to
//! the host's, regrow packs and keeps the contents' bookkeeping). Numbers are biased toward the
//! edges: small, around i32::MAX (the device's int32 limit) and around u32::MAX.
#![no_main]

use headwise::Error;
use headwise::attention::plan;
use headwise::layout::{LayerLayout, LayoutBuilder, MAX_BUILDER_SEGMENTS, MAX_ROWS, Segment, SegmentMode};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Num {
    Small(u8),
    NearI32Max(u8),
    NearU32Max(u8),
    Raw(u32),
}

impl Num {
    fn get(self) -> u32 {
        match self {
            Num::Small(x) => u32::from(x % 32),
            Num::NearI32Max(x) => (i32::MAX as u32 - 8).wrapping_add(u32::from(x % 16)),
            Num::NearU32Max(x) => u32::MAX - u32::from(x % 16),
            Num::Raw(x) => x,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Rows {
    Small(u8),
    NearMax(u8),
    Raw(u64),
}

/// Where a segment starts: anywhere, or just after the previous one (so that valid multi-segment
/// tables, and overlaps by a row or two, are common).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Offset {
    At(Num),
    AfterPrevious(i8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Seg {
    offset: Offset,
    capacity: Num,
    len: Num,
    ring_head: Num,
    streaming: Option<(Num, Num)>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    Full { b: u16, h: u16, len: Num },
    Streaming { b: u16, h: u16, sink: Num, window: Num },
}

/// batch x kv_heads of the table: usually matching the segment count (else only the count check
/// runs).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Shape {
    Matching(u8),
    Free(u8, u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    shape: Shape,
    total_rows: Rows,
    segments: Vec<Seg>,
    regrow_headroom: Num,
    sm_count: u8,
    builder_batch: u16,
    builder_kv_heads: u16,
    builder_headroom: Num,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    check_new(&input);
    check_builder(&input);
});

fn end(s: &Segment) -> u64 {
    u64::from(s.offset) + u64::from(s.capacity)
}

fn overlaps(a: &Segment, b: &Segment) -> bool {
    a.capacity > 0 && b.capacity > 0 && u64::from(a.offset) < end(b) && u64::from(b.offset) < end(a)
}

/// What is wrong with segment `s` on its own, by field name.
fn segment_faults(s: &Segment, total_rows: u64) -> Vec<&'static str> {
    let mut f = Vec::new();
    if end(s) > total_rows {
        f.push("capacity");
    }
    if s.len > s.capacity {
        f.push("len");
    }
    match s.mode {
        SegmentMode::Full => {
            if s.ring_head != 0 {
                f.push("ring_head");
            }
        }
        SegmentMode::Streaming { sink, window } => {
            if window == 0 {
                f.push("mode.window");
            }
            if u64::from(sink) + u64::from(window) != u64::from(s.capacity) {
                f.push("capacity");
            }
            if s.ring_head >= window || (s.len <= sink && s.ring_head != 0) {
                f.push("ring_head");
            }
        }
    }
    f
}

/// Whether the error's `field` names something that really is wrong with the table.
fn fault_is_real(field: &str, batch: usize, kv_heads: usize, total_rows: u64, segs: &[Segment]) -> bool {
    match field {
        "batch" => batch == 0,
        "kv_heads" => kv_heads == 0,
        "segments" => batch.checked_mul(kv_heads) != Some(segs.len()),
        "total_rows" => total_rows > MAX_ROWS,
        _ => {
            let Some(rest) = field.strip_prefix("segments[") else { return false };
            let Some((i, tail)) = rest.split_once(']') else { return false };
            let Ok(i) = i.parse::<usize>() else { return false };
            let Some(s) = segs.get(i) else { return false };
            match tail.strip_prefix('.') {
                None => tail.is_empty() && segs.iter().enumerate().any(|(j, o)| j != i && overlaps(s, o)),
                Some(f) => segment_faults(s, total_rows).contains(&f),
            }
        }
    }
}

fn valid(batch: usize, kv_heads: usize, total_rows: u64, segs: &[Segment]) -> bool {
    batch > 0
        && kv_heads > 0
        && batch * kv_heads == segs.len()
        && total_rows <= MAX_ROWS
        && segs.iter().all(|s| segment_faults(s, total_rows).is_empty())
        && !segs.iter().enumerate().any(|(i, a)| segs[i + 1..].iter().any(|b| overlaps(a, b)))
}

fn check_new(input: &Input) {
    let mut segs: Vec<Segment> = Vec::with_capacity(input.segments.len());
    for s in &input.segments {
        let offset = match s.offset {
            Offset::At(n) => n.get(),
            Offset::AfterPrevious(gap) => {
                let previous_end = segs.last().map_or(0, end);
                previous_end.saturating_add_signed(i64::from(gap % 3)).min(u64::from(u32::MAX)) as u32
            }
        };
        segs.push(Segment {
            offset,
            capacity: s.capacity.get(),
            len: s.len.get(),
            ring_head: s.ring_head.get(),
            mode: match s.streaming {
                None => SegmentMode::Full,
                Some((sink, window)) => SegmentMode::Streaming { sink: sink.get(), window: window.get() },
            },
        });
    }
    let total_rows = match input.total_rows {
        Rows::Small(x) => u64::from(x),
        Rows::NearMax(x) => MAX_ROWS - 8 + u64::from(x % 16),
        Rows::Raw(x) => x,
    };
    let (batch, kv_heads) = match input.shape {
        Shape::Matching(b) => match usize::from(b % 4) + 1 {
            b if segs.len().is_multiple_of(b) => (b, segs.len() / b),
            _ => (1, segs.len()),
        },
        Shape::Free(b, h) => (usize::from(b), usize::from(h)),
    };
    match LayerLayout::new(batch, kv_heads, total_rows, segs.clone()) {
        Err(Error::Invalid { field, reason }) => {
            assert!(!valid(batch, kv_heads, total_rows, &segs), "valid table rejected: {field}: {reason}");
            assert!(
                fault_is_real(&field, batch, kv_heads, total_rows, &segs),
                "{field} is not at fault: {reason}"
            );
        }
        Err(e) => panic!("not an Invalid error: {e}"),
        Ok(layout) => {
            assert!(valid(batch, kv_heads, total_rows, &segs), "invalid table accepted: {segs:?}");
            check_layout(&layout, input.regrow_headroom.get(), usize::from(input.sm_count));
        }
    }
}

/// Promises every validated layout keeps.
fn check_layout(layout: &LayerLayout, headroom: u32, sm_count: usize) {
    let segs = layout.segments();
    let n = segs.len();
    let table = layout.device_table();
    assert_eq!(table.len(), 6 * n);
    assert!(table[..5 * n].iter().all(|&x| x >= 0), "int32 fields stay non-negative");
    for (i, s) in segs.iter().enumerate() {
        assert_eq!(
            (table[i], table[n + i], table[2 * n + i]),
            (s.offset as i32, s.capacity as i32, s.len as i32)
        );
        // First and last few tokens (a segment may hold 2^31 rows): inside the segment, distinct.
        let probe: Vec<u32> = (0..s.len.min(8)).chain(s.len.saturating_sub(8)..s.len).collect();
        let mut rows: Vec<u64> = probe.iter().map(|&t| s.row(t)).collect();
        assert!(rows.iter().all(|&r| r >= u64::from(s.offset) && r < end(s)), "{s:?}");
        let mut tokens = probe.clone();
        tokens.sort_unstable();
        tokens.dedup();
        rows.sort_unstable();
        rows.dedup();
        assert_eq!(rows.len(), tokens.len(), "two tokens share a row: {s:?}");
        match s.append_row() {
            None => assert!(s.mode == SegmentMode::Full && s.len == s.capacity),
            Some(r) => assert!(r >= u64::from(s.offset) && r < end(s), "{s:?}"),
        }
    }
    match layout.check_appendable() {
        Ok(()) => assert!(!segs.iter().any(|s| s.mode == SegmentMode::Full && s.len == s.capacity)),
        Err(Error::SegmentFull { segment, capacity }) => {
            let first = segs.iter().position(|s| s.mode == SegmentMode::Full && s.len == s.capacity);
            assert_eq!(Some(segment), first);
            assert_eq!(capacity, segs[segment].capacity);
        }
        Err(e) => panic!("not SegmentFull: {e}"),
    }
    let want: u64 = segs
        .iter()
        .map(|s| match s.mode {
            SegmentMode::Full => u64::from(s.len) + u64::from(headroom),
            SegmentMode::Streaming { .. } => u64::from(s.capacity),
        })
        .sum();
    match layout.regrown(headroom) {
        Ok(g) => {
            assert!(want <= MAX_ROWS);
            assert_eq!(g.total_rows() as u64, want);
            let mut next = 0u64;
            for (a, b) in segs.iter().zip(g.segments()) {
                assert_eq!((a.mode, a.len, a.ring_head), (b.mode, b.len, b.ring_head));
                assert_eq!(u64::from(b.offset), next, "packed in segment order");
                next += u64::from(b.capacity);
            }
        }
        Err(Error::Invalid { field, .. }) => {
            assert_eq!(field, "headroom");
            assert!(want > MAX_ROWS);
        }
        Err(e) => panic!("not an Invalid error: {e}"),
    }
    let p = plan(layout, sm_count);
    let max_len = segs.iter().map(|s| s.len).max().unwrap_or(0);
    assert!(p.chunk_tokens >= 1 && p.max_splits >= 1);
    assert!(u64::from(p.chunk_tokens) * u64::from(p.max_splits) >= u64::from(max_len));
}

fn check_builder(input: &Input) {
    let (mut batch, mut kv_heads) = (usize::from(input.builder_batch), usize::from(input.builder_kv_heads));
    // Keep accepted builds small (a build allocates and sorts every segment); products past the
    // builder's limit stay, since they must fail without allocating.
    if batch * kv_heads > 4096 && batch * kv_heads <= MAX_BUILDER_SEGMENTS {
        (batch, kv_heads) = (batch % 64, kv_heads % 64);
    }
    let headroom = input.builder_headroom.get();
    let mut b = LayoutBuilder::new(batch, kv_heads).headroom(headroom);
    let mut slots = std::collections::BTreeMap::new();
    let mut outside = false;
    for &op in &input.ops {
        let (sb, sh) = match op {
            Op::Full { b, h, .. } | Op::Streaming { b, h, .. } => (usize::from(b), usize::from(h)),
        };
        let spec = match op {
            Op::Full { len, .. } => (SegmentMode::Full, len.get()),
            Op::Streaming { sink, window, .. } => {
                (SegmentMode::Streaming { sink: sink.get(), window: window.get() }, 0)
            }
        };
        b = match spec.0 {
            SegmentMode::Full => b.full(sb, sh, spec.1),
            SegmentMode::Streaming { sink, window } => b.streaming(sb, sh, sink, window),
        };
        if sb < batch && sh < kv_heads {
            slots.insert(sb * kv_heads + sh, spec);
        } else {
            outside = true;
        }
    }
    let n = batch * kv_heads;
    // The packed table the builder promises, as prefix sums of capacities.
    let caps: Vec<(SegmentMode, u64, u32)> = (0..if n <= MAX_BUILDER_SEGMENTS { n } else { 0 })
        .map(|i| {
            let (mode, len) = slots.get(&i).copied().unwrap_or((SegmentMode::Full, 0));
            let cap = match mode {
                SegmentMode::Full => u64::from(len) + u64::from(headroom),
                SegmentMode::Streaming { sink, window } => u64::from(sink) + u64::from(window),
            };
            (mode, cap, len)
        })
        .collect();
    let mut prefix = Vec::with_capacity(caps.len());
    let mut acc = 0u64;
    for c in &caps {
        acc += c.1;
        prefix.push(acc);
    }
    let window0 = |i: usize| matches!(caps.get(i), Some((SegmentMode::Streaming { window: 0, .. }, ..)));
    let valid =
        n > 0 && n <= MAX_BUILDER_SEGMENTS && !outside && acc <= MAX_ROWS && !(0..caps.len()).any(window0);
    match b.build() {
        Ok(layout) => {
            assert!(valid, "accepted: {batch} x {kv_heads}, outside {outside}, rows {acc}");
            let mut next = 0u64;
            for (s, &(mode, cap, len)) in layout.segments().iter().zip(&caps) {
                assert_eq!((s.mode, u64::from(s.offset), u64::from(s.capacity)), (mode, next, cap));
                assert_eq!(s.len, if mode == SegmentMode::Full { len } else { 0 });
                next += cap;
            }
            assert_eq!(layout.total_rows() as u64, acc);
            check_layout(&layout, input.regrow_headroom.get(), usize::from(input.sm_count));
        }
        Err(Error::Invalid { field, reason }) => {
            assert!(!valid, "rejected a valid build: {field}: {reason}");
            let real = match field.as_str() {
                "batch * kv_heads" => n > MAX_BUILDER_SEGMENTS,
                "segment" => outside,
                "batch" => batch == 0,
                "kv_heads" => kv_heads == 0,
                f => match f.strip_prefix("segments[").and_then(|r| r.split_once(']')) {
                    Some((i, "")) => {
                        i.parse::<usize>().is_ok_and(|i| prefix.get(i).is_some_and(|&p| p > MAX_ROWS))
                    }
                    Some((i, ".mode.window")) => i.parse::<usize>().is_ok_and(window0),
                    _ => false,
                },
            };
            assert!(real, "{field} is not at fault: {reason}");
        }
        Err(e) => panic!("not an Invalid error: {e}"),
    }
}
