//! The ragged per-head cache layout of one layer (SPEC section 2).
//!
//! K and V of a layer each live in one buffer of `total_rows` rows of `head_dim` elements. Every
//! (sequence, KV head) owns one [`Segment`] of that buffer: `offset` (first row), `capacity`
//! (rows reserved), `len` (rows in use) and a [`SegmentMode`]. Segment `s` belongs to sequence
//! `s / kv_heads`, KV head `s % kv_heads`.
//!
//! [`LayerLayout`] is the host's authoritative copy, validated on construction: no two segments
//! overlap, every segment lies inside the buffer, `len <= capacity`, streaming sizes add up. The
//! device holds a mirror ([`LayerLayout::device_table`], int32 arrays) that the kernels read and
//! advance; the host applies the same transitions so the two never need a round trip.
//!
//! Row addressing (`Segment::row`, `Segment::append_row`) has a device twin in
//! `cuda/segment.cuh`; kernels only address rows through it, so a paged variant can replace it.

use crate::error::{Error, Result};

/// How a segment stores its tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SegmentMode {
    /// Tokens in position order at rows `offset .. offset + len`; appending to a full segment is
    /// an error (compress or regrow first).
    Full,
    /// StreamingLLM / DuoAttention / RLKV head: the first `sink` tokens stay forever, later
    /// tokens go to a ring of `window` rows that overwrites its oldest entry. `capacity` is
    /// `sink + window`; appending never fails.
    Streaming {
        /// Attention-sink tokens kept from the start of the sequence.
        sink: u32,
        /// Most recent tokens kept (ring size, at least 1).
        window: u32,
    },
}

/// One (sequence, KV head) region of a layer's K/V buffers. All counts are rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Segment {
    /// First row.
    pub offset: u32,
    /// Rows reserved.
    pub capacity: u32,
    /// Rows in use (for `Streaming`, at most `sink + window`).
    pub len: u32,
    /// `Streaming` only: ring slot of the oldest windowed token (below `window`); 0 until the
    /// ring first fills, unless a [`crate::LayerCache::rollback`] dropped the newest tokens of
    /// a full ring. Always 0 for `Full`.
    pub ring_head: u32,
    /// Storage mode.
    pub mode: SegmentMode,
}

impl Segment {
    /// A `Full` segment.
    pub fn full(offset: u32, capacity: u32, len: u32) -> Segment {
        Segment { offset, capacity, len, ring_head: 0, mode: SegmentMode::Full }
    }

    /// An empty `Streaming` segment of `sink + window` rows.
    pub fn streaming(offset: u32, sink: u32, window: u32) -> Segment {
        Segment {
            offset,
            capacity: sink.saturating_add(window),
            len: 0,
            ring_head: 0,
            mode: SegmentMode::Streaming { sink, window },
        }
    }

    fn sink(&self) -> u32 {
        match self.mode {
            SegmentMode::Full => 0,
            SegmentMode::Streaming { sink, .. } => sink,
        }
    }

    /// Whether an append has no row to go to (only `Full` segments can be full).
    pub fn is_full(&self) -> bool {
        self.mode == SegmentMode::Full && self.len >= self.capacity
    }

    /// Buffer row of logical token `i` (`0 <= i < len`), oldest first.
    pub fn row(&self, i: u32) -> u64 {
        debug_assert!(i < self.len);
        match self.mode {
            SegmentMode::Streaming { sink, window } if i >= sink => {
                u64::from(self.offset)
                    + u64::from(sink)
                    + (u64::from(self.ring_head) + u64::from(i - sink)) % u64::from(window)
            }
            _ => u64::from(self.offset) + u64::from(i),
        }
    }

    /// Buffer row the next appended token goes to, or `None` for a full `Full` segment: for
    /// `Streaming`, the sinks first, then the ring slot after the newest token (the oldest slot
    /// once the ring is full).
    pub fn append_row(&self) -> Option<u64> {
        match self.mode {
            SegmentMode::Full if self.len >= self.capacity => None,
            SegmentMode::Streaming { sink, window } if self.len >= sink => Some(
                u64::from(self.offset)
                    + u64::from(sink)
                    + (u64::from(self.ring_head) + u64::from(self.len - sink)) % u64::from(window),
            ),
            _ => Some(u64::from(self.offset) + u64::from(self.len)),
        }
    }

    /// The state after dropping the newest `n <= len` tokens (the host twin of
    /// [`crate::LayerCache::rollback`]). A ring keeps `ring_head` (its oldest token stays where
    /// it is) until its windowed tokens are all gone.
    pub(crate) fn rolled_back(&self, n: u32) -> Segment {
        debug_assert!(n <= self.len);
        let mut s = *self;
        s.len -= n;
        if s.len <= self.sink() {
            s.ring_head = 0;
        }
        s
    }

    /// The state after one append (the host twin of the kernel's update).
    pub(crate) fn advanced(&self) -> Segment {
        let mut s = *self;
        match self.mode {
            SegmentMode::Streaming { window, .. } if self.len >= self.capacity => {
                s.ring_head = (self.ring_head + 1) % window;
            }
            _ => s.len += 1,
        }
        s
    }
}

/// Largest row count the device's int32 metadata can address.
pub const MAX_ROWS: u64 = i32::MAX as u64;

/// The validated segment table of one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerLayout {
    batch: usize,
    kv_heads: usize,
    total_rows: u32,
    segments: Vec<Segment>,
}

impl LayerLayout {
    /// Validates and wraps a segment table: `segments[b * kv_heads + h]` for sequence `b`, KV
    /// head `h`, inside a buffer of `total_rows` rows.
    ///
    /// Errors name the first offending field: a wrong segment count, `total_rows` above
    /// [`MAX_ROWS`], a segment past the end of the buffer, two segments overlapping, `len >
    /// capacity`, a streaming segment whose `capacity != sink + window` or whose window is 0, a
    /// `ring_head` outside the window or nonzero while the ring holds no token.
    pub fn new(
        batch: usize,
        kv_heads: usize,
        total_rows: u64,
        segments: Vec<Segment>,
    ) -> Result<LayerLayout> {
        if batch == 0 {
            return Err(Error::invalid("batch", "must be at least 1"));
        }
        if kv_heads == 0 {
            return Err(Error::invalid("kv_heads", "must be at least 1"));
        }
        let expected = batch.checked_mul(kv_heads).filter(|&n| n as u64 <= MAX_ROWS);
        if expected != Some(segments.len()) {
            return Err(Error::invalid(
                "segments",
                format!("expected batch * kv_heads = {batch} * {kv_heads} segments, got {}", segments.len()),
            ));
        }
        if total_rows > MAX_ROWS {
            return Err(Error::invalid(
                "total_rows",
                format!("{total_rows} exceeds {MAX_ROWS} (int32 rows)"),
            ));
        }
        for (i, s) in segments.iter().enumerate() {
            let field = |f: &str| format!("segments[{i}].{f}");
            let end = u64::from(s.offset) + u64::from(s.capacity);
            if end > total_rows {
                return Err(Error::invalid(
                    field("capacity"),
                    format!(
                        "offset {} + capacity {} = {end} exceeds total_rows {total_rows}",
                        s.offset, s.capacity
                    ),
                ));
            }
            if s.len > s.capacity {
                return Err(Error::invalid(
                    field("len"),
                    format!("{} exceeds capacity {}", s.len, s.capacity),
                ));
            }
            match s.mode {
                SegmentMode::Full => {
                    if s.ring_head != 0 {
                        return Err(Error::invalid(field("ring_head"), "must be 0 for a Full segment"));
                    }
                }
                SegmentMode::Streaming { sink, window } => {
                    if window == 0 {
                        return Err(Error::invalid(field("mode.window"), "must be at least 1"));
                    }
                    if u64::from(sink) + u64::from(window) != u64::from(s.capacity) {
                        return Err(Error::invalid(
                            field("capacity"),
                            format!("{} != sink {sink} + window {window}", s.capacity),
                        ));
                    }
                    if s.ring_head >= window || (s.len <= sink && s.ring_head != 0) {
                        return Err(Error::invalid(
                            field("ring_head"),
                            format!(
                                "{} must be below window {window}, and 0 while the ring is empty",
                                s.ring_head
                            ),
                        ));
                    }
                }
            }
        }
        let mut order: Vec<usize> = (0..segments.len()).filter(|&i| segments[i].capacity > 0).collect();
        order.sort_by_key(|&i| segments[i].offset);
        for w in order.windows(2) {
            let (a, b) = (&segments[w[0]], &segments[w[1]]);
            if u64::from(a.offset) + u64::from(a.capacity) > u64::from(b.offset) {
                return Err(Error::invalid(
                    format!("segments[{}]", w[1]),
                    format!(
                        "rows {}..{} overlap segments[{}] at rows {}..{}",
                        b.offset,
                        u64::from(b.offset) + u64::from(b.capacity),
                        w[0],
                        a.offset,
                        u64::from(a.offset) + u64::from(a.capacity)
                    ),
                ));
            }
        }
        Ok(LayerLayout { batch, kv_heads, total_rows: total_rows as u32, segments })
    }

    /// Sequences in the layer.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// KV heads per sequence.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }
    /// Rows in each of the K and V buffers.
    pub fn total_rows(&self) -> usize {
        self.total_rows as usize
    }
    /// All segments, `segments()[b * kv_heads + h]`.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }
    /// The segment of sequence `b`, KV head `h`.
    pub fn segment(&self, b: usize, h: usize) -> &Segment {
        &self.segments[b * self.kv_heads + h]
    }
    /// Rows in use over all segments.
    pub fn rows_in_use(&self) -> u64 {
        self.segments.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Errors with [`Error::SegmentFull`] naming the first `Full` segment an append could not
    /// take.
    pub fn check_appendable(&self) -> Result<()> {
        self.check_room(1)
    }

    /// Errors with [`Error::SegmentFull`] naming the first `Full` segment without room for
    /// `tokens` more rows (`Streaming` segments always have room: the ring overwrites).
    pub fn check_room(&self, tokens: usize) -> Result<()> {
        let short = |s: &Segment| s.mode == SegmentMode::Full && ((s.capacity - s.len) as usize) < tokens;
        match self.segments.iter().position(short) {
            Some(i) => Err(Error::SegmentFull { segment: i, capacity: self.segments[i].capacity }),
            None => Ok(()),
        }
    }

    /// The layout after `tokens` appends to every segment (call only after `check_room`).
    pub(crate) fn advance_all(&mut self, tokens: usize) {
        for s in &mut self.segments {
            for _ in 0..tokens {
                *s = s.advanced();
            }
        }
    }

    /// The layout after sequence `b` dropped its newest `tokens[b]` tokens in every segment
    /// ([`crate::LayerCache::rollback`]). Errors, naming `tokens[b]`, when a count is above the
    /// length of one of the sequence's segments, or when `tokens` has not `batch` entries.
    pub(crate) fn rolled_back(&self, tokens: &[u32]) -> Result<LayerLayout> {
        if tokens.len() != self.batch {
            return Err(Error::invalid(
                "tokens",
                format!("{} entries, expected batch {}", tokens.len(), self.batch),
            ));
        }
        let mut out = self.clone();
        for (i, s) in out.segments.iter_mut().enumerate() {
            let b = i / self.kv_heads.max(1);
            let n = tokens[b];
            if n > s.len {
                return Err(Error::invalid(
                    format!("tokens[{b}]"),
                    format!("{n} is more than segment {i} holds (len {})", s.len),
                ));
            }
            *s = s.rolled_back(n);
        }
        Ok(out)
    }

    /// A packed layout with the same segments (mode, len, ring state) where every `Full`
    /// segment gets `len + headroom` rows; `Streaming` segments keep their size. This is the
    /// target of a regrow, an O(total rows) copy meant to be amortized over `headroom` steps.
    pub fn regrown(&self, headroom: u32) -> Result<LayerLayout> {
        let mut offset = 0u64;
        let mut segs = Vec::with_capacity(self.segments.len());
        for (i, s) in self.segments.iter().enumerate() {
            let capacity = match s.mode {
                SegmentMode::Full => u64::from(s.len) + u64::from(headroom),
                SegmentMode::Streaming { .. } => u64::from(s.capacity),
            };
            if offset + capacity > MAX_ROWS {
                return Err(Error::invalid(
                    "headroom",
                    format!("{headroom} makes the layout exceed {MAX_ROWS} rows at segment {i}"),
                ));
            }
            segs.push(Segment { offset: offset as u32, capacity: capacity as u32, ..*s });
            offset += capacity;
        }
        LayerLayout::new(self.batch, self.kv_heads, offset, segs)
    }

    /// The int32 device mirror: six arrays of `num_segments` entries, back to back: offset,
    /// capacity, len, sink (0 for Full), ring_head, mode (`HW_MODE_FULL`/`HW_MODE_STREAMING`),
    /// the fields of `HwSegmentTable` in `cuda/params.h`.
    pub fn device_table(&self) -> Vec<i32> {
        let n = self.segments.len();
        let mut t = vec![0i32; DeviceTable::FIELDS * n];
        for (i, s) in self.segments.iter().enumerate() {
            // Every value fits: new() bounded all of them by MAX_ROWS.
            t[i] = s.offset as i32;
            t[n + i] = s.capacity as i32;
            t[2 * n + i] = s.len as i32;
            t[3 * n + i] = s.sink() as i32;
            t[4 * n + i] = s.ring_head as i32;
            t[5 * n + i] = match s.mode {
                SegmentMode::Full => crate::params::HW_MODE_FULL as i32,
                SegmentMode::Streaming { .. } => crate::params::HW_MODE_STREAMING as i32,
            };
        }
        t
    }
}

/// Where the arrays of [`LayerLayout::device_table`] sit in one int32 buffer.
pub(crate) struct DeviceTable;

impl DeviceTable {
    pub(crate) const FIELDS: usize = 6;

    /// The kernels' view of a device table at byte address `base` (device or emulator memory).
    pub(crate) fn params(base: u64, num_segments: usize) -> crate::params::HwSegmentTable {
        let at = |field: usize| (base + (field * num_segments * 4) as u64) as *mut i32;
        crate::params::HwSegmentTable {
            offset: at(0),
            capacity: at(1),
            len: at(2),
            sink: at(3),
            ring_head: at(4),
            mode: at(5),
            num_segments: num_segments as i32,
        }
    }
}

/// Most segments [`LayoutBuilder`] builds (2^24: a batch of 131072 sequences of 128 KV heads).
pub const MAX_BUILDER_SEGMENTS: usize = 1 << 24;

/// Builds a packed layout: segments in segment order, back to back.
///
/// Every segment starts `Full` with `len` 0; `Full` segments get `len + headroom` rows so the
/// decode loop can append `headroom` tokens before a regrow. Nothing is allocated before
/// [`LayoutBuilder::build`], which checks the segment count.
#[derive(Clone, Debug)]
pub struct LayoutBuilder {
    batch: usize,
    kv_heads: usize,
    headroom: u32,
    specs: std::collections::BTreeMap<usize, (SegmentMode, u32)>,
}

impl LayoutBuilder {
    /// A builder for `batch` sequences of `kv_heads` KV heads, all `Full` and empty.
    pub fn new(batch: usize, kv_heads: usize) -> LayoutBuilder {
        LayoutBuilder { batch, kv_heads, headroom: 0, specs: Default::default() }
    }

    /// Rows reserved beyond `len` in every `Full` segment.
    pub fn headroom(mut self, rows: u32) -> Self {
        self.headroom = rows;
        self
    }

    /// Makes segment (`b`, `h`) `Full` holding `len` tokens (rows the caller fills). Out-of-range
    /// `b`/`h` are reported by `build`.
    pub fn full(self, b: usize, h: usize, len: u32) -> Self {
        self.set(b, h, (SegmentMode::Full, len))
    }

    /// Makes segment (`b`, `h`) an empty `Streaming` segment. Out-of-range `b`/`h` are reported
    /// by `build`.
    pub fn streaming(self, b: usize, h: usize, sink: u32, window: u32) -> Self {
        self.set(b, h, (SegmentMode::Streaming { sink, window }, 0))
    }

    fn set(mut self, b: usize, h: usize, spec: (SegmentMode, u32)) -> Self {
        // An out-of-range key lands past every valid slot (usize::MAX) and fails build().
        let slot = match b.checked_mul(self.kv_heads).and_then(|x| x.checked_add(h)) {
            Some(slot) if b < self.batch && h < self.kv_heads => slot,
            _ => usize::MAX,
        };
        self.specs.insert(slot, spec);
        self
    }

    /// Packs and validates the layout.
    pub fn build(self) -> Result<LayerLayout> {
        let n = match self.batch.checked_mul(self.kv_heads) {
            Some(n) if n <= MAX_BUILDER_SEGMENTS => n,
            _ => {
                return Err(Error::invalid(
                    "batch * kv_heads",
                    format!("{} * {} exceeds {MAX_BUILDER_SEGMENTS} segments", self.batch, self.kv_heads),
                ));
            }
        };
        if self.specs.contains_key(&usize::MAX) {
            return Err(Error::invalid(
                "segment",
                format!("a (sequence, kv_head) outside {} x {} was set", self.batch, self.kv_heads),
            ));
        }
        let mut offset = 0u64;
        let mut segs = Vec::with_capacity(n);
        for i in 0..n {
            let (mode, len) = self.specs.get(&i).copied().unwrap_or((SegmentMode::Full, 0));
            let start = offset.min(MAX_ROWS) as u32;
            let seg = match mode {
                SegmentMode::Full => {
                    let cap = u64::from(len) + u64::from(self.headroom);
                    Segment::full(start, cap.min(u64::from(u32::MAX)) as u32, len)
                }
                SegmentMode::Streaming { sink, window } => Segment::streaming(start, sink, window),
            };
            offset += u64::from(seg.capacity);
            if offset > MAX_ROWS {
                return Err(Error::invalid(
                    format!("segments[{i}]"),
                    format!("the packed layout exceeds {MAX_ROWS} rows"),
                ));
            }
            segs.push(seg);
        }
        LayerLayout::new(self.batch, self.kv_heads, offset, segs)
    }
}
