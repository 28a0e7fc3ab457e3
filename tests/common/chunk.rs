//! Chunks of `q_len > 1` queries per sequence (chunked prefill, follow-up turns, speculative
//! verification) and the multi-token append / rollback around them, generic over the store
//! (tests/attention_chunk.rs on the emulator, tests/gpu.rs on a GPU).

use super::values;
use headwise::layout::{LayerLayout, Segment, SegmentMode};
use headwise::{AttentionOptions, AttentionWorkspace, KvElem, LayerCache, Store, reference};

/// A layer of every kind of segment a chunk can meet, each holding at least `q_len` tokens:
/// Full segments (one exactly `q_len`, one long enough to split), a full ring that wrapped, a
/// ring a rollback left not full with `ring_head != 0`, and a ring still filling whose sink holds
/// a chunk token. Two sequences x three KV heads.
pub fn chunk_layout(q_len: u32) -> LayerLayout {
    let w = q_len.max(6);
    let mut segs = vec![
        Segment::full(0, q_len + 1, q_len),
        Segment { len: 2 + w, ring_head: w / 2, ..Segment::streaming(0, 2, w) },
        Segment { len: 3 + w - 1, ring_head: 1, ..Segment::streaming(0, 3, w) },
        Segment { len: q_len, ..Segment::streaming(0, 1, w) },
        Segment::full(0, 300 + q_len, 290 + q_len),
        Segment::full(0, q_len + 9, q_len + 7),
    ];
    let mut off = 0;
    for (i, s) in segs.iter_mut().enumerate() {
        off += i as u32; // gaps
        s.offset = off;
        off += s.capacity;
    }
    LayerLayout::new(2, 3, u64::from(off), segs).unwrap()
}

/// Runs `attention_chunk` (for `q_len = 1`, `attention`) through `store` and compares every
/// query row with [`reference::attention_chunk`]: relative L2 error of the output below the
/// decode tolerance (1e-3 f16, 1e-2 bf16), LSE within 1e-3; a row that sees no token (an empty
/// segment) exactly zero with LSE -inf. Outputs start as NaN, so a row the kernels never write
/// fails.
#[allow(clippy::too_many_arguments)]
pub fn chunk_scenario<S: Store, T: KvElem>(
    store: &S,
    layout: &LayerLayout,
    head_dim: usize,
    group: usize,
    q_len: usize,
    opts: AttentionOptions,
    with_lse: bool,
    seed: u64,
) {
    let rows = layout.total_rows();
    let qrows = layout.segments().len() * group * q_len;
    let amp = 1.0 + (seed % 3) as f32;
    let k = values::<T>(seed ^ 11, rows * head_dim, amp);
    let v = values::<T>(seed ^ 22, rows * head_dim, 1.0);
    let q = values::<T>(seed ^ 33, qrows * head_dim, amp);
    let cache = LayerCache::<S, T>::from_parts(
        store,
        layout.clone(),
        head_dim,
        store.upload(&k).unwrap(),
        store.upload(&v).unwrap(),
    )
    .unwrap();
    let nan = bytemuck::cast::<u16, T>(if T::DTYPE == headwise::DType::F16 { 0x7e00 } else { 0x7fc0 });
    let mut out = store.upload(&vec![nan; qrows * head_dim]).unwrap();
    let mut lse = store.upload(&vec![f32::NAN; qrows]).unwrap();
    let mut ws = AttentionWorkspace::new();
    let dq = store.upload(&q).unwrap();
    let lse_out = with_lse.then_some(&mut lse);
    if q_len == 1 {
        cache.attention(&dq, group, &mut out, lse_out, &mut ws, &opts).unwrap();
    } else {
        cache.attention_chunk(&dq, q_len, group, &mut out, lse_out, &mut ws, &opts).unwrap();
    }
    let scale = f64::from(opts.scale.unwrap_or(1.0 / (head_dim as f32).sqrt()));
    let (want, want_lse) = reference::attention_chunk(layout, head_dim, &k, &v, &q, q_len, group, scale);
    let got: Vec<f64> = store.download(&out).unwrap().iter().map(|x| f64::from(x.to_f32())).collect();
    let got_lse = store.download(&lse).unwrap();
    let tol = if T::DTYPE == headwise::DType::F16 { 1e-3 } else { 1e-2 };
    let what = format!("d{head_dim} G{group} q_len {q_len} {:?} {opts:?}", T::DTYPE);
    for r in 0..qrows {
        let (o, w) = (&got[r * head_dim..(r + 1) * head_dim], &want[r * head_dim..(r + 1) * head_dim]);
        let err: f64 = o.iter().zip(w).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
        let norm: f64 = w.iter().map(|b| b * b).sum::<f64>().sqrt();
        let empty = want_lse[r] == f64::NEG_INFINITY;
        if empty {
            assert!(o.iter().all(|&x| x == 0.0), "{what}: query row {r} sees no token: zeros, got {o:?}");
        }
        assert!(
            err <= tol * norm.max(1e-3),
            "{what}: query row {r}: relative L2 error {:.3e} > {tol:e}",
            err / norm
        );
        if with_lse {
            let (a, b) = (f64::from(got_lse[r]), want_lse[r]);
            assert!(!empty || a == b, "{what}: query row {r} sees no token: LSE {a}, want -inf");
            assert!(
                empty || (a - b).abs() <= 1e-3 * b.abs().max(1.0),
                "{what}: query row {r}: LSE {a} vs reference {b}"
            );
        } else {
            assert!(got_lse[r].is_nan(), "{what}: LSE written although not requested");
        }
    }
}

/// The logical tokens of one segment as an independent model sees them: ids oldest first.
/// Append pushes; a `Streaming` segment whose ring holds `window` tokens drops its oldest
/// windowed token; rollback truncates.
#[derive(Clone, Debug)]
pub struct Model {
    pub mode: SegmentMode,
    pub tokens: Vec<u32>,
}

impl Model {
    pub fn push(&mut self, id: u32) {
        self.tokens.push(id);
        if let SegmentMode::Streaming { sink, window } = self.mode
            && self.tokens.len() > (sink + window) as usize
        {
            self.tokens.remove(sink as usize);
        }
    }
}

/// Every segment's logical tokens in the cache equal the model's: the K row of logical token
/// `i` is the row appended as id `tokens[i]` (K row of id x: every element `values` of seed x),
/// and V likewise.
pub fn check_against_model<S: Store, T: KvElem>(cache: &LayerCache<S, T>, models: &[Model], what: &str) {
    let d = cache.head_dim();
    let k = cache.store().download(cache.k()).unwrap();
    let v = cache.store().download(cache.v()).unwrap();
    for (s, (seg, m)) in cache.layout().segments().iter().zip(models).enumerate() {
        assert_eq!(seg.len as usize, m.tokens.len(), "{what}: segment {s} len ({seg:?})");
        for (i, &id) in m.tokens.iter().enumerate() {
            let r = seg.row(i as u32) as usize;
            let bits = |x: &[T]| x.iter().map(|e| bytemuck::cast::<T, u16>(*e)).collect::<Vec<_>>();
            assert_eq!(
                bits(&k[r * d..(r + 1) * d]),
                bits(&token_row::<T>(id, d, 0)),
                "{what}: segment {s} token {i} K"
            );
            assert_eq!(
                bits(&v[r * d..(r + 1) * d]),
                bits(&token_row::<T>(id, d, 1)),
                "{what}: segment {s} token {i} V"
            );
        }
    }
}

/// The K (`which` 0) or V (1) row of token id `id`.
pub fn token_row<T: KvElem>(id: u32, d: usize, which: u64) -> Vec<T> {
    values(u64::from(id) * 2 + which + 1, d, 1.0)
}

/// `[batch][tokens][kv_heads][d]` rows for the next `tokens` ids of every segment (ids from
/// `next`, one per segment and token), with the ids per segment in order.
pub fn chunk_rows<T: KvElem>(
    layout: &LayerLayout,
    d: usize,
    tokens: usize,
    next: &mut u32,
) -> (Vec<T>, Vec<T>, Vec<Vec<u32>>) {
    let (batch, kvh) = (layout.batch(), layout.kv_heads());
    let mut ids = vec![Vec::new(); batch * kvh];
    let (mut k, mut v) = (Vec::new(), Vec::new());
    for b in 0..batch {
        for _ in 0..tokens {
            for h in 0..kvh {
                let id = *next;
                *next += 1;
                ids[b * kvh + h].push(id);
                k.extend(token_row::<T>(id, d, 0));
                v.extend(token_row::<T>(id, d, 1));
            }
        }
    }
    (k, v, ids)
}
