//! Shared test scenarios, generic over the store so the emulator and the GPU run the same checks.
#![allow(dead_code)]

use headwise::layout::{LayerLayout, Segment, SegmentMode};
use headwise::{Error, KvElem, LayerCache, Store, reference};
use proptest::prelude::*;

/// One segment of a random layout: its mode and initial length (Full) plus headroom.
#[derive(Clone, Debug)]
pub enum SegSpec {
    Full { len: u32, headroom: u32 },
    Streaming { sink: u32, window: u32 },
}

pub fn seg_spec() -> impl Strategy<Value = SegSpec> {
    prop_oneof![
        (0u32..5, 0u32..6).prop_map(|(len, headroom)| SegSpec::Full { len, headroom }),
        (0u32..4, 1u32..6).prop_map(|(sink, window)| SegSpec::Streaming { sink, window }),
    ]
}

/// A packed layout from specs, with `gaps[i]` unused rows before segment i (so offsets are not
/// simply cumulative).
pub fn build_layout(batch: usize, kv_heads: usize, specs: &[SegSpec], gaps: &[u32]) -> LayerLayout {
    let mut off = 0u32;
    let mut segs = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        off += gaps.get(i).copied().unwrap_or(0);
        let seg = match *s {
            SegSpec::Full { len, headroom } => Segment::full(off, len + headroom, len),
            SegSpec::Streaming { sink, window } => Segment::streaming(off, sink, window),
        };
        off += seg.capacity;
        segs.push(seg);
    }
    LayerLayout::new(batch, kv_heads, u64::from(off) + 1, segs).unwrap()
}

/// Deterministic "random" bits for element buffers (xorshift), including NaN/Inf patterns.
pub fn bits<T: KvElem>(seed: u64, n: usize) -> Vec<T> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytemuck::cast::<u16, T>(x as u16)
        })
        .collect()
}

fn raw<T: KvElem>(v: &[T]) -> Vec<u16> {
    v.iter().map(|&e| bytemuck::cast::<T, u16>(e)).collect()
}

/// The logical contents a segment must hold after the appends in `history`: a Full segment all
/// of them, a Streaming one its first `sink` and its last `window` (an independent model of the
/// ring, not the row arithmetic under test).
fn expected_tokens(mode: SegmentMode, history: &[Vec<u16>]) -> Vec<Vec<u16>> {
    match mode {
        SegmentMode::Full => history.to_vec(),
        SegmentMode::Streaming { sink, window } => {
            let sink = (sink as usize).min(history.len());
            let rest = &history[sink..];
            let keep = rest.len().min(window as usize);
            history[..sink].iter().chain(&rest[rest.len() - keep..]).cloned().collect()
        }
    }
}

/// Appends `steps` random tokens through `store` and through the CPU reference, both starting
/// from the same poisoned buffers. After every step: identical layouts, the device table equal to
/// the host's, K and V byte-identical (every row, written or not), and each segment's tokens, read
/// in logical order, equal to the independent model. A full `Full` segment must make both sides
/// fail with SegmentFull; the test then regrows (with `regrow_headroom`) and carries on.
pub fn append_scenario<S: Store, T: KvElem>(
    store: &S,
    layout: LayerLayout,
    head_dim: usize,
    steps: usize,
    regrow_headroom: u32,
    seed: u64,
) {
    let rows = layout.total_rows();
    let poison_k = bits::<T>(seed ^ 1, rows * head_dim);
    let poison_v = bits::<T>(seed ^ 2, rows * head_dim);
    let mut ref_layout = layout.clone();
    let (mut ref_k, mut ref_v) = (poison_k.clone(), poison_v.clone());
    let mut cache = LayerCache::<S, T>::from_parts(
        store,
        layout.clone(),
        head_dim,
        store.upload(&poison_k).unwrap(),
        store.upload(&poison_v).unwrap(),
    )
    .unwrap();

    let n = layout.segments().len();
    // History per segment: the initial Full rows (poison), then every appended K row.
    let mut history: Vec<Vec<Vec<u16>>> = (0..n)
        .map(|s| {
            reference::token_rows(&layout, s)
                .iter()
                .map(|&r| raw(&poison_k[r as usize * head_dim..(r as usize + 1) * head_dim]))
                .collect()
        })
        .collect();

    for step in 0..steps {
        let k_new = bits::<T>(seed.wrapping_add(1000 + step as u64), n * head_dim);
        let v_new = bits::<T>(seed.wrapping_add(5000 + step as u64), n * head_dim);
        let (dk, dv) = (store.upload(&k_new).unwrap(), store.upload(&v_new).unwrap());
        let got = cache.append(&dk, &dv);
        let want = reference::append(&mut ref_layout, head_dim, &mut ref_k, &mut ref_v, &k_new, &v_new);
        match (got, want) {
            (Ok(()), Ok(())) => {
                for (s, h) in history.iter_mut().enumerate() {
                    h.push(raw(&k_new[s * head_dim..(s + 1) * head_dim]));
                }
            }
            (Err(Error::SegmentFull { segment: a, .. }), Err(Error::SegmentFull { segment: b, .. })) => {
                assert_eq!(a, b, "step {step}: both must name the same full segment");
                cache.regrow(regrow_headroom).unwrap();
                // The reference regrow: rows move to the new offsets, physical order kept.
                let target = ref_layout.regrown(regrow_headroom).unwrap();
                let mut k2 = vec![T::default(); target.total_rows() * head_dim];
                let mut v2 = k2.clone();
                for (a, b) in ref_layout.segments().iter().zip(target.segments()) {
                    let (src, dst) = (a.offset as usize * head_dim, b.offset as usize * head_dim);
                    let len = a.len as usize * head_dim;
                    k2[dst..dst + len].copy_from_slice(&ref_k[src..src + len]);
                    v2[dst..dst + len].copy_from_slice(&ref_v[src..src + len]);
                }
                // Rows beyond len are unspecified after a regrow: compare only what both wrote,
                // by taking the store's bytes for them.
                let got_k = store.download(cache.k()).unwrap();
                let got_v = store.download(cache.v()).unwrap();
                for b in target.segments() {
                    let (lo, hi) =
                        ((b.offset + b.len) as usize * head_dim, (b.offset + b.capacity) as usize * head_dim);
                    k2[lo..hi].copy_from_slice(&got_k[lo..hi]);
                    v2[lo..hi].copy_from_slice(&got_v[lo..hi]);
                }
                ref_layout = target;
                ref_k = k2;
                ref_v = v2;
            }
            (got, want) => panic!("step {step}: store gave {got:?}, reference gave {want:?}"),
        }
        assert_eq!(cache.layout(), &ref_layout, "step {step}: layouts differ");
        assert_eq!(
            store.download(cache.device_table()).unwrap(),
            ref_layout.device_table(),
            "step {step}: device table differs from the host layout"
        );
        let got_k = store.download(cache.k()).unwrap();
        let got_v = store.download(cache.v()).unwrap();
        assert!(raw(&got_k) == raw(&ref_k), "step {step}: K differs from the reference");
        assert!(raw(&got_v) == raw(&ref_v), "step {step}: V differs from the reference");
        for (s, (seg, hist)) in ref_layout.segments().iter().zip(&history).enumerate() {
            let logical: Vec<Vec<u16>> = reference::token_rows(&ref_layout, s)
                .iter()
                .map(|&r| raw(&got_k[r as usize * head_dim..(r as usize + 1) * head_dim]))
                .collect();
            assert_eq!(
                logical,
                expected_tokens(seg.mode, hist),
                "step {step}: segment {s} holds the wrong tokens"
            );
        }
    }
}

/// A segment of a random attention layout: Full with `len` tokens, or Streaming with a ring
/// either filling or full (and then rotated by `ring_head`).
#[derive(Clone, Debug)]
pub enum AttnSeg {
    Full { len: u32 },
    Streaming { sink: u32, window: u32, fill: u32, ring_head: u32 },
}

pub fn attn_seg(max_len: u32) -> impl Strategy<Value = AttnSeg> {
    prop_oneof![
        prop_oneof![Just(0u32), Just(1), 0..max_len].prop_map(|len| AttnSeg::Full { len }),
        (0u32..5, 1u32..40, 0u32..60, 0u32..40).prop_map(|(sink, window, fill, rh)| AttnSeg::Streaming {
            sink,
            window,
            fill,
            ring_head: rh % window
        }),
    ]
}

pub fn attn_layout(batch: usize, kv_heads: usize, segs: &[AttnSeg]) -> LayerLayout {
    let mut off = 0u32;
    let mut out = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        off += (i % 3) as u32; // gaps between segments
        let seg = match *s {
            AttnSeg::Full { len } => Segment::full(off, len + 2, len),
            AttnSeg::Streaming { sink, window, fill, ring_head } => {
                let mut g = Segment::streaming(off, sink, window);
                g.len = fill.min(g.capacity);
                g.ring_head = if g.len == g.capacity { ring_head } else { 0 };
                g
            }
        };
        off += seg.capacity;
        out.push(seg);
    }
    LayerLayout::new(batch, kv_heads, u64::from(off), out).unwrap()
}

/// Values in [-amp, amp] (a few rows get a larger spike so softmax is not flat).
pub fn values<T: KvElem>(seed: u64, n: usize, amp: f32) -> Vec<T> {
    let mut x = seed.wrapping_mul(0x2545F4914F6CDD1D) | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            let spike = if (x >> 8).is_multiple_of(97) { 4.0 } else { 1.0 };
            T::from_f32(u * amp * spike * if i % 7 == 0 { 1.5 } else { 1.0 })
        })
        .collect()
}

/// Runs attention through `store` and compares with the f64 reference: per query head, the
/// relative L2 error of the output below `tol` (SPEC section 7: 1e-3 for f16, 1e-2 for bf16),
/// LSE within 1e-3, empty segments exactly zero with LSE -inf. Outputs are poisoned with NaN
/// first, so an element the kernel failed to write shows up.
pub fn attention_scenario<S: Store, T: KvElem>(
    store: &S,
    layout: LayerLayout,
    head_dim: usize,
    group: usize,
    opts: headwise::AttentionOptions,
    with_lse: bool,
    seed: u64,
) {
    let rows = layout.total_rows();
    let n = layout.segments().len();
    let heads = n * group;
    let amp = 1.0 + (seed % 3) as f32;
    let k = values::<T>(seed ^ 11, rows * head_dim, amp);
    let v = values::<T>(seed ^ 22, rows * head_dim, 1.0);
    let q = values::<T>(seed ^ 33, heads * head_dim, amp);
    let cache = LayerCache::<S, T>::from_parts(
        store,
        layout.clone(),
        head_dim,
        store.upload(&k).unwrap(),
        store.upload(&v).unwrap(),
    )
    .unwrap();
    let nan = bytemuck::cast::<u16, T>(if T::DTYPE == headwise::DType::F16 { 0x7e00 } else { 0x7fc0 });
    let mut out = store.upload(&vec![nan; heads * head_dim]).unwrap();
    let mut lse = store.upload(&vec![f32::NAN; heads]).unwrap();
    let dq = store.upload(&q).unwrap();
    let mut ws = headwise::AttentionWorkspace::new();
    cache.attention(&dq, group, &mut out, with_lse.then_some(&mut lse), &mut ws, &opts).unwrap();

    let scale = f64::from(opts.scale.unwrap_or(1.0 / (head_dim as f32).sqrt()));
    let (want, want_lse) = reference::attention(&layout, head_dim, &k, &v, &q, group, scale);
    let got: Vec<f64> = store.download(&out).unwrap().iter().map(|x| f64::from(x.to_f32())).collect();
    let got_lse = store.download(&lse).unwrap();
    let tol = if T::DTYPE == headwise::DType::F16 { 1e-3 } else { 1e-2 };
    for h in 0..heads {
        let seg = layout.segments()[h / group];
        let (o, r) = (&got[h * head_dim..(h + 1) * head_dim], &want[h * head_dim..(h + 1) * head_dim]);
        if seg.len == 0 {
            assert!(o.iter().all(|&x| x == 0.0), "head {h}: empty segment must give zeros, got {o:?}");
        } else {
            let err: f64 = o.iter().zip(r).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
            let norm: f64 = r.iter().map(|b| b * b).sum::<f64>().sqrt();
            assert!(
                err <= tol * norm.max(1e-3),
                "head {h} (segment {:?}): relative L2 error {:.3e} > {tol:e}",
                seg,
                err / norm
            );
        }
        if with_lse {
            let (a, b) = (f64::from(got_lse[h]), want_lse[h]);
            if b == f64::NEG_INFINITY {
                assert_eq!(a, b, "head {h}: LSE of an empty segment");
            } else {
                assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "head {h}: LSE {a} vs reference {b}");
            }
        } else {
            assert!(got_lse[h].is_nan(), "LSE written although not requested");
        }
    }
}
