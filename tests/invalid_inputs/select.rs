//! Prefill compression (`select`: compress, compress_into, the scored and packed forms, sinks
//! and threshold) and Expected Attention scores, on the launch-counting store. Part of
//! tests/invalid_inputs.rs.

use super::*;

/// A valid prompt shape, options and budgets for `select::compress`; buffer lengths are held
/// separately so a fault can break one of them.
#[derive(Clone, Debug)]
pub(super) struct SelCase {
    pub(super) batch: usize,
    pub(super) kv_heads: usize,
    pub(super) group: usize,
    pub(super) q_len: usize,
    pub(super) head_dim: usize,
    pub(super) opts: SelectOptions,
    pub(super) budgets: SelBudgets,
    pub(super) k_len: usize,
    pub(super) v_len: usize,
    pub(super) queries_len: usize,
}

#[derive(Clone, Debug)]
pub(super) enum SelBudgets {
    PerRow(Vec<u32>),
    AdaKv { base: u32, floor_alpha: f32 },
}

impl SelCase {
    fn rows_per_sequence(&self) -> usize {
        match self.opts.granularity {
            Granularity::KvHead => self.kv_heads,
            Granularity::QueryHead => self.kv_heads * self.group,
        }
    }
    fn rows(&self) -> usize {
        self.batch * self.rows_per_sequence()
    }
    /// Tokens row `r` keeps at least (AdaKV: the window; it may keep up to `q_len`).
    fn least_kept(&self, r: usize) -> u32 {
        match &self.budgets {
            SelBudgets::PerRow(b) => b[r].min(self.q_len as u32),
            SelBudgets::AdaKv { .. } => self.opts.window as u32,
        }
    }
    /// Tokens row `r` may keep at most.
    fn most_kept(&self, r: usize) -> u32 {
        match &self.budgets {
            SelBudgets::PerRow(b) => b[r].min(self.q_len as u32),
            SelBudgets::AdaKv { .. } => self.q_len as u32,
        }
    }
    fn budgets(&self) -> Budgets<'_> {
        match &self.budgets {
            SelBudgets::PerRow(b) => Budgets::PerRow(b),
            &SelBudgets::AdaKv { base, floor_alpha } => Budgets::AdaKv { base, floor_alpha },
        }
    }
    /// Per-row budgets, valid for this shape (replacing AdaKV's).
    fn per_row(&mut self, x: u32) {
        if let SelBudgets::AdaKv { .. } = self.budgets {
            let w = self.opts.window as u32;
            self.budgets = SelBudgets::PerRow((0..self.rows() as u32).map(|r| w + (x + r) % 7).collect());
        }
    }
    /// Buffers of the lengths held, and the call's prompt over them.
    fn bufs(&self, s: &Counting) -> [EmuBuf<bf16>; 3] {
        [self.k_len, self.v_len, self.queries_len].map(|n| s.zeros::<bf16>(n).unwrap())
    }
    fn prompt<'a>(&self, b: &'a [EmuBuf<bf16>; 3]) -> Prompt<'a, Counting, bf16> {
        Prompt {
            k: &b[0],
            v: &b[1],
            queries: &b[2],
            batch: self.batch,
            kv_heads: self.kv_heads,
            group_size: self.group,
            q_len: self.q_len,
            head_dim: self.head_dim,
            packing: Default::default(),
        }
    }
}

pub(super) fn sel_case() -> impl Strategy<Value = SelCase> {
    let shape =
        (1usize..=2, 1usize..=3, 1usize..=4, 1usize..=24, prop::sample::select(SUPPORTED_HEAD_DIMS.to_vec()));
    let opts = (
        any::<u32>(),
        any::<u32>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(None), (0.01f32..10.0).prop_map(Some), (-10.0f32..-0.01).prop_map(Some)],
        0u32..4,
        prop_oneof![Just(None), (1u32..30).prop_map(Some)],
    );
    let budgets = (any::<bool>(), prop::collection::vec(0u32..30, 24), any::<u32>(), 0.0f32..=1.0);
    (shape, opts, budgets).prop_map(|((batch, kv_heads, group, q, d), o, (ada, per_row, base, alpha))| {
        let (ws, ps, avg, gmax, per_qh, scale, headroom, chunk_tokens) = o;
        let window = 1 + ws as usize % q;
        let opts = SelectOptions {
            window,
            pool_kernel: 2 * (ps as usize % q.div_ceil(2)) + 1,
            pool: if avg { Pool::Avg } else { Pool::Max },
            gqa: if gmax { GqaReduce::Max } else { GqaReduce::Mean },
            granularity: if per_qh { Granularity::QueryHead } else { Granularity::KvHead },
            scale,
            // The queries' faults below are faults of SnapKV scoring.
            score: Score::SnapKv,
            sink: 0,
            headroom,
            chunk_tokens,
        };
        let rows = batch * kv_heads * if per_qh { group } else { 1 };
        let budgets = if ada {
            SelBudgets::AdaKv { base: (window + base as usize % (q + 5)) as u32, floor_alpha: alpha }
        } else {
            SelBudgets::PerRow(per_row[..rows].iter().map(|&x| window as u32 + x).collect())
        };
        let kv = batch * kv_heads * q * d;
        SelCase {
            batch,
            kv_heads,
            group,
            q_len: q,
            head_dim: d,
            opts,
            budgets,
            k_len: kv,
            v_len: kv,
            queries_len: batch * kv_heads * group * window * d,
        }
    })
}

#[derive(Clone, Debug)]
pub(super) enum SelFault {
    HeadDim(usize),
    BatchZero,
    KvHeadsZero,
    GroupSize(usize),
    QLenZero,
    WindowZero,
    WindowAboveQ(u32),
    PoolEven(usize),
    PoolAboveQ(u32),
    K(u32),
    V(u32),
    Queries(u32),
    QueriesOfOtherWindow(u32),
    BudgetCount(bool),
    BudgetBelowWindow(usize, u32),
    AdaBaseBelowWindow(u32),
    AdaBaseHuge(u32),
    AdaFloorAlpha(f32),
    Scale(f32),
    ChunkZero,
    Headroom(u32),
    SegmentsAboveMaxRows(u8, u32),
    RowsTimesQ(bool, u32),
    QueryRowsAboveMaxRows(u32),
}

pub(super) fn sel_fault() -> impl Strategy<Value = SelFault> {
    let x = any::<u32>();
    prop_oneof![
        bad_head_dim().prop_map(SelFault::HeadDim),
        Just(SelFault::BatchZero),
        Just(SelFault::KvHeadsZero),
        prop_oneof![Just(0usize), MAX_SELECT_GROUP + 1..200, Just(usize::MAX)].prop_map(SelFault::GroupSize),
        Just(SelFault::QLenZero),
        Just(SelFault::WindowZero),
        x.prop_map(SelFault::WindowAboveQ),
        prop_oneof![(0usize..40).prop_map(|k| 2 * k), Just(usize::MAX - 1)].prop_map(SelFault::PoolEven),
        x.prop_map(SelFault::PoolAboveQ),
        x.prop_map(SelFault::K),
        x.prop_map(SelFault::V),
        x.prop_map(SelFault::Queries),
        x.prop_map(SelFault::QueriesOfOtherWindow),
        any::<bool>().prop_map(SelFault::BudgetCount),
        (0usize..48, x).prop_map(|(i, x)| SelFault::BudgetBelowWindow(i, x)),
        x.prop_map(SelFault::AdaBaseBelowWindow),
        x.prop_map(SelFault::AdaBaseHuge),
        prop::sample::select(vec![
            f32::NAN,
            -f32::NAN,
            -0.1,
            -1e-7,
            1.0 + f32::EPSILON,
            1.5,
            f32::INFINITY,
            -f32::INFINITY,
            f32::MAX
        ])
        .prop_map(SelFault::AdaFloorAlpha),
        prop::sample::select(vec![
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -f32::MAX,
            3.0e38,
            -2.4e38
        ])
        .prop_map(SelFault::Scale),
        Just(SelFault::ChunkZero),
        x.prop_map(SelFault::Headroom),
        (0u8..3, x).prop_map(|(k, x)| SelFault::SegmentsAboveMaxRows(k, x)),
        (any::<bool>(), x).prop_map(|(o, x)| SelFault::RowsTimesQ(o, x)),
        x.prop_map(SelFault::QueryRowsAboveMaxRows),
    ]
}

/// Breaks `c` in the one way `fault` says and returns what `compress` must report (`None` for
/// a fault that does not apply to `compress_into`, which has no headroom).
pub(super) fn apply_sel(c: &mut SelCase, fault: &SelFault, into: bool) -> Option<Expect> {
    let q = c.q_len;
    let w = c.opts.window;
    let rows = c.rows();
    Some(match *fault {
        SelFault::HeadDim(d) => {
            c.head_dim = d;
            invalid("head_dim")
        }
        SelFault::BatchZero => {
            c.batch = 0;
            invalid("batch")
        }
        SelFault::KvHeadsZero => {
            c.kv_heads = 0;
            invalid("kv_heads")
        }
        SelFault::GroupSize(g) => {
            c.group = g;
            invalid("group_size")
        }
        SelFault::QLenZero => {
            c.q_len = 0;
            invalid("q_len")
        }
        SelFault::WindowZero => {
            c.opts.window = 0;
            invalid("window")
        }
        SelFault::WindowAboveQ(x) => {
            c.opts.window = if x % 5 == 0 { usize::MAX } else { q + 1 + x as usize % 100 };
            invalid("window")
        }
        SelFault::PoolEven(k) => {
            c.opts.pool_kernel = k;
            invalid("pool_kernel")
        }
        SelFault::PoolAboveQ(x) => {
            c.opts.pool_kernel = if x % 5 == 0 { usize::MAX } else { (q + 1 + x as usize % 50) | 1 };
            invalid("pool_kernel")
        }
        SelFault::K(x) => {
            c.k_len = wrong_len(c.k_len, c.batch * c.kv_heads * q, x);
            invalid("k")
        }
        SelFault::V(x) => {
            c.v_len = wrong_len(c.v_len, c.batch * c.kv_heads * q, x);
            invalid("v")
        }
        SelFault::Queries(x) => {
            c.queries_len = wrong_len(c.queries_len, c.batch * c.kv_heads * c.group * w, x);
            invalid("queries")
        }
        SelFault::QueriesOfOtherWindow(x) => {
            // A valid window the queries were not written for (budgets, checked later, may be
            // below it).
            if q >= 2 {
                c.opts.window = 1 + (w + x as usize % (q - 1)) % q;
                c.opts.pool_kernel = 1;
            } else {
                c.queries_len += 1 + x as usize % 64;
            }
            invalid("queries")
        }
        SelFault::BudgetCount(add) => {
            let mut b: Vec<u32> = (0..rows).map(|r| c.least_kept(r).max(w as u32)).collect();
            if add {
                b.push(w as u32);
            } else {
                b.pop();
            }
            c.budgets = SelBudgets::PerRow(b);
            invalid("budgets")
        }
        SelFault::BudgetBelowWindow(i, x) => {
            c.per_row(x);
            let i = i % rows;
            if let SelBudgets::PerRow(b) = &mut c.budgets {
                b[i] = x % w as u32;
            }
            invalid(format!("budgets[{i}]"))
        }
        SelFault::AdaBaseBelowWindow(x) => {
            c.budgets = SelBudgets::AdaKv { base: x % w as u32, floor_alpha: 0.2 };
            invalid("budgets.base")
        }
        SelFault::AdaBaseHuge(x) => {
            // rows_per_sequence * (base - window) beyond int32 rows.
            let rps = c.rows_per_sequence() as u64;
            let least = (MAX_ROWS / rps + 1 + w as u64) as u32;
            c.budgets = SelBudgets::AdaKv {
                base: least.saturating_add(x % (u32::MAX - least + 1)),
                floor_alpha: 0.5,
            };
            invalid("budgets.base")
        }
        SelFault::AdaFloorAlpha(a) => {
            c.budgets = SelBudgets::AdaKv { base: w as u32 + 3, floor_alpha: a };
            invalid("budgets.floor_alpha")
        }
        SelFault::Scale(s) => {
            c.opts.scale = Some(s);
            invalid("scale")
        }
        SelFault::ChunkZero => {
            c.opts.chunk_tokens = Some(0);
            invalid("chunk_tokens")
        }
        SelFault::Headroom(x) => {
            if into {
                return None;
            }
            // Every row keeps at least one token: rows * (1 + MAX_ROWS / rows) > MAX_ROWS.
            c.opts.headroom = (MAX_ROWS / rows as u64) as u32 + x % 1000;
            invalid("headroom")
        }
        SelFault::SegmentsAboveMaxRows(kind, x) => {
            let x = x as usize % 1000;
            match kind {
                // batch * kv_heads past int32 rows, or past usize.
                0 => (c.batch, c.kv_heads) = (1 << 16, (1 << 15) + x),
                1 => (c.batch, c.kv_heads) = (usize::MAX - x, 2),
                // Per query head: batch * kv_heads fits, times G does not.
                _ => {
                    (c.batch, c.kv_heads, c.group) = (1 << 8, (1 << 20) + x, 16);
                    c.opts.granularity = Granularity::QueryHead;
                }
            }
            invalid("batch")
        }
        SelFault::RowsTimesQ(overflow, x) => {
            if overflow {
                c.q_len = usize::MAX - x as usize % 1000;
            } else {
                (c.kv_heads, c.q_len) = ((1 << 20) + x as usize % 1000, 1 << 12);
            }
            invalid("q_len")
        }
        SelFault::QueryRowsAboveMaxRows(x) => {
            // segments * q_len fits (per KV head), segments * G * window does not.
            (c.batch, c.kv_heads, c.q_len, c.group) = (1, 1 << 20, 1 << 10, 2 + x as usize % 15);
            c.opts.granularity = Granularity::KvHead;
            (c.opts.window, c.opts.pool_kernel) = (1 << 10, 1);
            invalid("window")
        }
    })
}

pub(super) fn select_compress(b: &mut Battery) {
    b.run("select::compress", 8_000, (sel_case(), sel_fault()), |p, (mut c, fault)| {
        let Some(expect) = apply_sel(&mut c, &fault, false) else { return Ok(()) };
        let s = store(p);
        let bufs = c.bufs(&s);
        let mut ws = SelectWorkspace::new();
        p.call(expect, || compress(&s, &c.prompt(&bufs), c.budgets(), &c.opts, &mut ws))?;
        check(ws.kept(&s).is_err(), || "a refused compress left a selection in the workspace".into())
    });
    // More than 65535 chunks: one long prompt (131071 tokens) split into 1- or 2-token chunks.
    let s = Counting(b.launches.clone());
    let (q, d, w) = (2 * 65535 + 1, 64, 4);
    let kv = s.zeros::<bf16>(q * d).unwrap();
    let queries = s.zeros::<bf16>(w * d).unwrap();
    let prompt = Prompt::<Counting, bf16> {
        k: &kv,
        v: &kv,
        queries: &queries,
        batch: 1,
        kv_heads: 1,
        group_size: 1,
        q_len: q,
        head_dim: d,
        packing: Default::default(),
    };
    let chunks = (1u32..=2, any::<bool>(), 0u32..100);
    b.run("select::compress", 100, chunks, |p, (chunk, ada, x)| {
        let opts = SelectOptions { window: w, chunk_tokens: Some(chunk), ..SelectOptions::default() };
        let per_row = [w as u32 + x];
        let budgets = if ada {
            Budgets::AdaKv { base: w as u32 + x, floor_alpha: 0.2 }
        } else {
            Budgets::PerRow(&per_row)
        };
        let mut ws = SelectWorkspace::new();
        p.call(invalid("chunk_tokens"), || compress(&s, &prompt, budgets, &opts, &mut ws))?;
        Ok(())
    });
    b.controls("select::compress", |p| {
        // Controls: valid compressions (per KV head with per-row budgets, per query head with
        // AdaKV) launch and keep min(budget, q) rows per segment.
        let s = store(p);
        let (q, d, g, w) = (40, 64, 2, 8);
        let data =
            |n: usize| s.upload(&(0..n).map(|i| bf16::from_f32((i % 13) as f32 / 7.0)).collect::<Vec<_>>());
        let (k, v, queries) =
            (data(2 * q * d).unwrap(), data(2 * q * d).unwrap(), data(2 * g * w * d).unwrap());
        let prompt = Prompt::<Counting, bf16> {
            k: &k,
            v: &v,
            queries: &queries,
            batch: 1,
            kv_heads: 2,
            group_size: g,
            q_len: q,
            head_dim: d,
            packing: Default::default(),
        };
        let mut ws = SelectWorkspace::new();
        let opts = SelectOptions { window: w, pool_kernel: 5, headroom: 2, ..SelectOptions::default() };
        let before = p.launches.get();
        let c = p.call(Expect::Ok, || compress(&s, &prompt, Budgets::PerRow(&[12, 60]), &opts, &mut ws))?;
        let c = c.expect("Ok");
        check(p.launches.get() > before, || "a valid compress did not launch".into())?;
        let lens: Vec<(u32, u32)> = c.layout().segments().iter().map(|s| (s.len, s.capacity)).collect();
        check(lens == [(12, 14), (40, 42)], || format!("(len, capacity) {lens:?}"))?;
        let per_qh = SelectOptions { granularity: Granularity::QueryHead, ..opts };
        let ada = Budgets::AdaKv { base: 16, floor_alpha: 0.2 };
        let c = p.call(Expect::Ok, || compress(&s, &prompt, ada, &per_qh, &mut ws))?.expect("Ok");
        let segs = c.layout().segments();
        check(segs.len() == 4 && segs.iter().all(|s| (w as u32..=q as u32).contains(&s.len)), || {
            format!("{segs:?}")
        })
    });
}

#[derive(Clone, Debug)]
pub(super) enum DestFault {
    HeadDim(usize),
    Count(u32),
    Streaming(usize),
    Capacity(usize, u32),
}

/// A destination for `c` (one `Full` segment per score row, room for what the row may keep,
/// gaps and stale lengths), broken as `fault` says; and what `compress_into` must report.
pub(super) fn sel_dest(
    c: &mut SelCase,
    fault: Option<&DestFault>,
    x: u32,
) -> (LayerLayout, usize, Option<Expect>) {
    let (mut batch, mut rps, mut d) = (c.batch, c.rows_per_sequence(), c.head_dim);
    let mut expect = None;
    let mut streaming = None;
    let mut short = None;
    match fault {
        None => {}
        Some(&DestFault::HeadDim(k)) => {
            d = SUPPORTED_HEAD_DIMS
                [(SUPPORTED_HEAD_DIMS.iter().position(|&s| s == d).unwrap() + 1 + k % 2) % 3];
            expect = Some(invalid("dest.head_dim"));
        }
        Some(&DestFault::Count(k)) => {
            // Another grid: one more sequence or head, one head fewer, or the other granularity.
            match k % 4 {
                0 => batch += 1,
                1 => rps += 1,
                2 if rps > 1 => rps -= 1,
                _ if c.group > 1 => {
                    rps = match c.opts.granularity {
                        Granularity::KvHead => c.kv_heads * c.group,
                        Granularity::QueryHead => c.kv_heads,
                    }
                }
                _ => rps += 2,
            }
            expect = Some(invalid("dest.layout"));
        }
        Some(&DestFault::Streaming(i)) => {
            let i = i % c.rows();
            streaming = Some(i);
            expect = Some(invalid(format!("dest.segments[{i}].mode")));
        }
        Some(&DestFault::Capacity(i, _)) => {
            c.per_row(x);
            let i = i % c.rows();
            short = Some(i);
            expect = Some(invalid(format!("dest.segments[{i}].capacity")));
        }
    }
    let mut segs = Vec::new();
    let mut off = 0u32;
    for r in 0..batch * rps {
        off += (x >> (r % 8)) % 3;
        let need = if r < c.rows() { c.most_kept(r) } else { 4 };
        let mut s = if streaming == Some(r) {
            Segment::streaming(off, 1, need)
        } else {
            let cap = match (short, fault) {
                (Some(i), Some(&DestFault::Capacity(_, y))) if i == r => y % need,
                _ => need + (x >> (r % 16)) % 4,
            };
            Segment::full(off, cap, 0)
        };
        if s.mode == SegmentMode::Full {
            s.len = (x >> (r % 16)) % (s.capacity + 1);
        }
        off += s.capacity;
        segs.push(s);
    }
    let layout = LayerLayout::new(batch, rps, u64::from(off) + u64::from(x % 5), segs).unwrap();
    (layout, d, expect)
}

/// Packed prompts (`Packing::Varlen`): a valid prompt of mixed lengths, or one fault at a time
/// in the offsets (count, first entry, a decreasing entry, a sequence shorter than the window,
/// q_len not the longest) or in a buffer's length; the field named must be the fault's.
pub(super) fn select_compress_packed(b: &mut Battery) {
    use headwise::select::Packing;
    b.run(
        "select::compress (packed, cu_seqlens)",
        1_000,
        (
            (1usize..4, 1usize..3, prop_oneof![Just(1usize), Just(2), Just(4)], 1usize..8),
            prop::collection::vec(0usize..30, 3),
            prop_oneof![3 => Just(None), 1 => (0u8..8, 1usize..4).prop_map(Some)],
        ),
        |p, ((batch, kv_heads, group, window), extra, fault)| {
            let s = store(p);
            let d = 64;
            let mut lens: Vec<usize> = (0..batch).map(|b| window + extra[b]).collect();
            let mut q_len = *lens.iter().max().unwrap();
            let mut expect = Expect::Ok;
            let mut kv_delta = [0usize; 2];
            let mut q_delta = 0usize;
            let mut cu: Vec<u32> = std::iter::once(0)
                .chain(lens.iter().scan(0u32, |a, &l| {
                    *a += l as u32;
                    Some(*a)
                }))
                .collect();
            match fault {
                None => {}
                Some((0, delta)) => {
                    cu.extend(std::iter::repeat_n(*cu.last().unwrap(), delta));
                    expect = invalid("cu_seqlens");
                }
                Some((1, delta)) => {
                    for c in cu.iter_mut() {
                        *c += delta as u32;
                    }
                    expect = invalid("cu_seqlens[0]");
                }
                Some((2, delta)) if batch > 1 => {
                    // Sequence 1 ends before it starts.
                    cu[2] = cu[1].saturating_sub(delta as u32);
                    expect = invalid("cu_seqlens[2]");
                }
                Some((3, _)) if window > 1 => {
                    lens[batch - 1] = window - 1;
                    cu[batch] = cu[batch - 1] + lens[batch - 1] as u32;
                    q_len = *lens.iter().max().unwrap();
                    expect = if q_len < window {
                        invalid("window")
                    } else {
                        invalid(format!("cu_seqlens[{batch}]"))
                    };
                }
                Some((4, delta)) => {
                    q_len += delta;
                    expect = invalid("q_len");
                }
                Some((5, delta)) => {
                    kv_delta[0] = delta;
                    expect = invalid("k");
                }
                Some((6, delta)) => {
                    kv_delta[1] = delta;
                    expect = invalid("v");
                }
                Some((_, delta)) => {
                    q_delta = delta;
                    expect = invalid("queries");
                }
            }
            let total = *cu.last().unwrap() as usize;
            let kv = total * kv_heads * d;
            let (k, v, q) = (
                s.zeros::<bf16>(kv + kv_delta[0]).unwrap(),
                s.zeros::<bf16>(kv + kv_delta[1]).unwrap(),
                s.zeros::<bf16>(total * kv_heads * group * d + q_delta).unwrap(),
            );
            let prompt = Prompt {
                k: &k,
                v: &v,
                queries: &q,
                batch,
                kv_heads,
                group_size: group,
                q_len,
                head_dim: d,
                packing: Packing::Varlen { cu_seqlens: &cu },
            };
            let opts = SelectOptions { window, pool_kernel: 1, ..SelectOptions::default() };
            let budgets = vec![window as u32 + 3; batch * kv_heads];
            let mut ws = SelectWorkspace::new();
            p.call(expect, || compress(&s, &prompt, Budgets::PerRow(&budgets), &opts, &mut ws).map(|_| ()))?;
            Ok(())
        },
    );
}

/// Attention sinks and threshold keep: a valid KNorm prompt, sinks up to past q_len, per-row
/// budgets around window + sink, thresholds including NaN and the infinities; the field named
/// must be the fault's (sink first, then the budgets).
pub(super) fn select_sinks_threshold(b: &mut Battery) {
    b.run(
        "select::compress (sinks, threshold)",
        1_000,
        (
            (1usize..3, 1usize..30, 1usize..6, 0usize..34),
            prop_oneof![
                2 => prop::collection::vec(0u32..40, 1..3).prop_map(Some),
                1 => Just(None),
            ],
            prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY), -2.0f32..2.0],
        ),
        |p, ((kv_heads, q, window, sink), per_row, threshold)| {
            let s = store(p);
            let (d, window) = (64, 1 + (window - 1) % q);
            let (k, none) = (s.zeros::<bf16>(kv_heads * q * d).unwrap(), s.zeros::<bf16>(0).unwrap());
            let prompt = Prompt {
                k: &k,
                v: &k,
                queries: &none,
                batch: 1,
                kv_heads,
                group_size: 1,
                q_len: q,
                head_dim: d,
                packing: Default::default(),
            };
            let opts = SelectOptions {
                window,
                pool_kernel: 1,
                sink,
                score: Score::KeyNorm,
                ..SelectOptions::default()
            };
            let rows: Vec<u32> = match &per_row {
                Some(v) => (0..kv_heads).map(|r| v[r % v.len()]).collect(),
                None => Vec::new(),
            };
            let (budgets, expect) = match per_row {
                Some(_) => {
                    let low = rows.iter().position(|&x| (x as usize) < window + sink);
                    let e = if sink > q {
                        invalid("sink")
                    } else if let Some(i) = low {
                        invalid(format!("budgets[{i}]"))
                    } else {
                        Expect::Ok
                    };
                    (Budgets::PerRow(&rows), e)
                }
                None => {
                    let e = if sink > q {
                        invalid("sink")
                    } else if threshold.is_nan() {
                        invalid("budgets.threshold")
                    } else {
                        Expect::Ok
                    };
                    (Budgets::Threshold(threshold), e)
                }
            };
            let mut ws = SelectWorkspace::new();
            p.call(expect, || compress(&s, &prompt, budgets, &opts, &mut ws).map(|_| ()))?;
            Ok(())
        },
    );
}

/// Expected Attention scores: shapes, lengths of every buffer, window, sink and epsilon out of
/// range, one fault at a time or none; a valid call launches and the two kernels run.
pub(super) fn scores_expected_attention(b: &mut Battery) {
    use headwise::scores::{ExpectedAttention, ScoreWorkspace, expected_attention};
    let shape = (
        1usize..3,
        1usize..3,
        prop_oneof![4 => 1usize..5, 1 => Just(0usize), 1 => 17usize..20],
        1usize..24,
        prop_oneof![Just(64usize), Just(128), Just(96)],
    );
    let fault = prop_oneof![4 => Just(None), 1 => (0u8..8, 1usize..5).prop_map(Some)];
    b.run(
        "scores::expected_attention",
        1_000,
        (shape, 0usize..30, 0usize..30, fault),
        |p, ((batch, kv_heads, group, q, d), window, sink, fault)| {
            let s = store(p);
            let segments = batch * kv_heads;
            let window = 1 + window % q;
            let sink = sink % q;
            let n = q - window;
            let (mut kv, mut mean, mut cov, mut out) =
                (segments * q * d, segments * group * d, segments * group * d * d, segments * n);
            let mut o = ExpectedAttention { sink, ..ExpectedAttention::default() };
            let mut win = window;
            // The expected field when the shape itself is fine and one fault is planted.
            let planted = fault.map(|(f, delta)| match f {
                0 => {
                    kv += delta;
                    "k"
                }
                1 => {
                    mean += delta;
                    "mean"
                }
                2 => {
                    cov += delta;
                    "cov"
                }
                3 => {
                    out += delta;
                    "scores"
                }
                4 => {
                    win = 0;
                    "window"
                }
                5 => {
                    win = q + delta;
                    "window"
                }
                6 => {
                    o.sink = q + delta - 1;
                    "sink"
                }
                _ => {
                    o.epsilon = f32::INFINITY;
                    "epsilon"
                }
            });
            let shape_fault = if ![64, 128, 256].contains(&d) {
                Some("head_dim")
            } else if group == 0 || group > 16 {
                Some("group_size")
            } else {
                None
            };
            let expect = match (shape_fault, planted) {
                (Some(f), _) => invalid(f),
                (None, Some(f)) => invalid(f),
                (None, None) => Expect::Ok,
            };
            let (kb, vb, none) = (
                s.zeros::<bf16>(kv).unwrap(),
                s.zeros::<bf16>(segments * q * d).unwrap(),
                s.zeros::<bf16>(0).unwrap(),
            );
            let prompt = Prompt {
                k: &kb,
                v: &vb,
                queries: &none,
                batch,
                kv_heads,
                group_size: group,
                q_len: q,
                head_dim: d,
                packing: Default::default(),
            };
            let (mb, cb) = (s.zeros::<f32>(mean).unwrap(), s.zeros::<f32>(cov).unwrap());
            let mut ob = s.zeros::<f32>(out).unwrap();
            let mut ws = ScoreWorkspace::new();
            p.call(expect, || expected_attention(&s, &prompt, &mb, Some(&cb), win, &o, &mut ob, &mut ws))?;
            Ok(())
        },
    );
}

/// The scores primitive: a valid prompt and destination, given scores of the right length or
/// not, with either computed score in the options (ignored): the Rust outcome of the same call
/// with SnapKV scoring is the expectation, except that the scores' length is checked too.
pub(super) fn select_compress_into_scored(b: &mut Battery) {
    b.run(
        "select::compress_into_scored",
        300,
        (sel_case(), any::<u32>(), prop_oneof![3 => Just(0i64), 1 => -3i64..4]),
        |p, (mut c, x, delta)| {
            let s = store(p);
            let (layout, d, _) = sel_dest(&mut c, None, x);
            let mut dest = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
            let bufs = c.bufs(&s);
            let rows =
                c.batch * c.kv_heads * if c.opts.granularity == Granularity::QueryHead { c.group } else { 1 };
            let n = c.q_len.saturating_sub(c.opts.window);
            let len = ((rows * n) as i64 + delta).max(0) as usize;
            let scores = s.upload(&vec![0.25f32; len]).unwrap();
            // The same call with SnapKV's own scores, on a copy of the destination, names the
            // shape faults; the queries are not read here, so their faults do not count.
            let queries_ok = SelCase {
                queries_len: c.batch * c.kv_heads * c.group * c.opts.window * c.head_dim,
                ..c.clone()
            };
            let plain = Counting(Rc::new(Cell::new(0)));
            let mut probe_dest = LayerCache::<_, bf16>::new(&plain, layout.clone(), d).unwrap();
            let pb = queries_ok.bufs(&plain);
            let rust = compress_into(
                &mut probe_dest,
                &queries_ok.prompt(&pb),
                c.budgets(),
                &c.opts,
                &mut SelectWorkspace::new(),
            );
            let expect = match rust {
                Ok(()) if len == rows * n => Expect::Ok,
                Ok(()) => invalid("scores"),
                Err(Error::Invalid { field, .. }) => Expect::Invalid(field),
                Err(e) => return Err(TestCaseError::fail(format!("the SnapKV probe failed otherwise: {e}"))),
            };
            let mut ws = SelectWorkspace::new();
            p.call(expect, || {
                compress_into_scored(&mut dest, &c.prompt(&bufs), &scores, c.budgets(), &c.opts, &mut ws)
            })?;
            Ok(())
        },
    );
}

pub(super) fn select_compress_into(b: &mut Battery) {
    let dest_fault = prop_oneof![
        (0usize..2).prop_map(DestFault::HeadDim),
        any::<u32>().prop_map(DestFault::Count),
        (0usize..48).prop_map(DestFault::Streaming),
        (0usize..48, any::<u32>()).prop_map(|(i, y)| DestFault::Capacity(i, y)),
    ];
    // Half the cases break the prompt, options or budgets (the destination fits), half the
    // destination.
    let fault = prop_oneof![sel_fault().prop_map(Ok), dest_fault.prop_map(Err)];
    b.run("select::compress_into", 8_000, (sel_case(), fault, any::<u32>()), |p, (mut c, fault, x)| {
        let s = store(p);
        let (layout, d, expect) = match &fault {
            Ok(f) => {
                let (layout, d, _) = sel_dest(&mut c, None, x);
                let Some(expect) = apply_sel(&mut c, f, true) else { return Ok(()) };
                (layout, d, expect)
            }
            Err(f) => {
                let (layout, d, expect) = sel_dest(&mut c, Some(f), x);
                (layout, d, expect.expect("a destination fault"))
            }
        };
        let mut dest = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
        let bufs = c.bufs(&s);
        let mut ws = SelectWorkspace::new();
        p.call(expect, || compress_into(&mut dest, &c.prompt(&bufs), c.budgets(), &c.opts, &mut ws))?;
        check(dest.layout() == &layout, || "a refused compress_into changed the destination".into())
    });
    b.controls("select::compress_into", |p| {
        // Control: a valid compression into a layout with gaps and headroom launches and sets
        // each segment's len to min(budget, q).
        let s = store(p);
        let (q, d, w) = (40, 64, 8);
        let data =
            |n: usize| s.upload(&(0..n).map(|i| bf16::from_f32((i % 11) as f32 / 5.0)).collect::<Vec<_>>());
        let (k, v, queries) = (data(2 * q * d).unwrap(), data(2 * q * d).unwrap(), data(2 * w * d).unwrap());
        let prompt = Prompt::<Counting, bf16> {
            k: &k,
            v: &v,
            queries: &queries,
            batch: 2,
            kv_heads: 1,
            group_size: 1,
            q_len: q,
            head_dim: d,
            packing: Default::default(),
        };
        let layout =
            LayerLayout::new(2, 1, 70, vec![Segment::full(3, 20, 5), Segment::full(30, 40, 0)]).unwrap();
        let mut dest = LayerCache::<_, bf16>::new(&s, layout, d).unwrap();
        let opts = SelectOptions { window: w, pool_kernel: 3, ..SelectOptions::default() };
        let before = p.launches.get();
        let mut ws = SelectWorkspace::new();
        p.call(Expect::Ok, || compress_into(&mut dest, &prompt, Budgets::PerRow(&[20, 50]), &opts, &mut ws))?;
        check(p.launches.get() > before, || "a valid compress_into did not launch".into())?;
        let lens: Vec<u32> = dest.layout().segments().iter().map(|s| s.len).collect();
        check(lens == [20, 40], || format!("lens {lens:?}"))
    });
}
