//! Packed prompts (token-major, `cu_seqlens`, flash-attn varlen) with mixed lengths in one launch:
//! every prefill pass against each sequence compressed alone in head-major form (bit for bit:
//! same chunking, so the same f32 arithmetic per segment) and against the f64 reference. Generic
//! over the store (tests/packed_prompts.rs on the emulator, tests/gpu.rs on a GPU).

use super::{SCORE_TOL, values};
use headwise::scores::{self, ExpectedAttention, ScoreWorkspace};
use headwise::select::{
    Budgets, Granularity, Packing, Prompt, Score, SelectOptions, SelectWorkspace, compress,
    compress_into_scored,
};
use headwise::{KvElem, LayerCache, LayoutBuilder, Store, reference};

/// Lengths of the sequences: one exactly the window (no prefix), one a token longer, the rest
/// longer than a scoring chunk at every head_dim.
pub const LENS: [usize; 4] = [37, 8, 70, 9];
const KV: usize = 2;
const W: usize = 8;

/// One sequence in head-major form, with every token's queries.
struct Seq<T> {
    len: usize,
    /// `[KV][len][d]`
    k: Vec<T>,
    v: Vec<T>,
    /// `[KV * G][len][d]`
    q: Vec<T>,
}

impl<T: KvElem> Seq<T> {
    /// The window's queries, `[KV * G][W][d]`.
    fn window_queries(&self, heads: usize, d: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(heads * W * d);
        for h in 0..heads {
            let first = (h * self.len + self.len - W) * d;
            out.extend_from_slice(&self.q[first..first + W * d]);
        }
        out
    }
}

fn sequences<T: KvElem>(d: usize, group: usize, seed: u64) -> Vec<Seq<T>> {
    LENS.iter()
        .enumerate()
        .map(|(b, &len)| Seq {
            len,
            k: values(seed + 10 * b as u64, KV * len * d, 1.0),
            v: values(seed + 10 * b as u64 + 1, KV * len * d, 1.0),
            q: values(seed + 10 * b as u64 + 2, KV * group * len * d, 2.0),
        })
        .collect()
}

/// `[total][heads][d]` from per-sequence `[heads][len][d]`.
fn pack<T: KvElem>(seqs: &[Seq<T>], heads: usize, d: usize, of: impl Fn(&Seq<T>) -> &Vec<T>) -> Vec<T> {
    let mut out = Vec::new();
    for s in seqs {
        let x = of(s);
        for t in 0..s.len {
            for h in 0..heads {
                out.extend_from_slice(&x[(h * s.len + t) * d..(h * s.len + t + 1) * d]);
            }
        }
    }
    out
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// f32 test values (the f16 generator's, widened).
fn values_f32(seed: u64, n: usize, amp: f32) -> Vec<f32> {
    values::<half::f16>(seed, n, amp).iter().map(|x| x.to_f32()).collect()
}

/// The K and V rows of every segment of a cache, in token order, as bits (f16/bf16 widen to f32
/// exactly).
fn rows_of<S: Store, T: KvElem>(store: &S, c: &LayerCache<S, T>) -> Vec<(Vec<u32>, Vec<u32>)> {
    let d = c.head_dim();
    let (k, v) = (store.download(c.k()).unwrap(), store.download(c.v()).unwrap());
    c.layout()
        .segments()
        .iter()
        .map(|s| {
            let r = s.offset as usize * d..(s.offset + s.len) as usize * d;
            let b = |x: &[T]| x.iter().map(|e| e.to_f32().to_bits()).collect();
            (b(&k[r.clone()]), b(&v[r]))
        })
        .collect()
}

/// SnapKV with per-row budgets and AdaKV, KNorm and given scores, per KV head and per query
/// head, and Expected Attention's scores, on a 4-sequence packed prompt of lengths [`LENS`].
pub fn packed_prompts_match_head_major<S: Store, T: KvElem>(store: &S, d: usize, group: usize, seed: u64) {
    let heads = KV * group;
    let seqs = sequences::<T>(d, group, seed);
    let mut cu = vec![0u32];
    for s in &seqs {
        cu.push(cu.last().unwrap() + s.len as u32);
    }
    let longest = *LENS.iter().max().unwrap();
    let (pk, pv, pq) = (
        store.upload(&pack(&seqs, KV, d, |s| &s.k)).unwrap(),
        store.upload(&pack(&seqs, KV, d, |s| &s.v)).unwrap(),
        store.upload(&pack(&seqs, heads, d, |s| &s.q)).unwrap(),
    );
    let packed = Prompt {
        k: &pk,
        v: &pv,
        queries: &pq,
        batch: LENS.len(),
        kv_heads: KV,
        group_size: group,
        q_len: longest,
        head_dim: d,
        packing: Packing::Varlen { cu_seqlens: &cu },
    };
    let alone: Vec<_> = seqs
        .iter()
        .map(|s| {
            (
                store.upload(&s.k).unwrap(),
                store.upload(&s.v).unwrap(),
                store.upload(&s.window_queries(heads, d)).unwrap(),
            )
        })
        .collect();
    let alone_prompt = |b: usize| Prompt {
        k: &alone[b].0,
        v: &alone[b].1,
        queries: &alone[b].2,
        batch: 1,
        kv_heads: KV,
        group_size: group,
        q_len: LENS[b],
        head_dim: d,
        packing: Packing::HeadMajor,
    };
    // One scoring tile per chunk, so the longest sequence spans several splits at every head_dim
    // and both runs split the same way.
    let chunk = (8192 / d) as u32;
    for granularity in [Granularity::KvHead, Granularity::QueryHead] {
        let per_seg = if granularity == Granularity::QueryHead { group } else { 1 };
        let rps = KV * per_seg;
        let rows = LENS.len() * rps;
        // Budgets from the window to past the longest sequence (keep everything).
        let per_row: Vec<u32> = (0..rows).map(|r| (W + (r * 11) % 70) as u32).collect();
        let prefix: Vec<usize> = (0..rows).map(|r| LENS[r / rps] - W).collect();
        let given: Vec<f32> =
            (0..rows).flat_map(|r| (0..prefix[r]).map(move |t| ((r * 31 + t * 17) % 13) as f32)).collect();
        let given_buf = store.upload(&given).unwrap();
        for (what, score, budgets) in [
            ("SnapKV", Some(Score::SnapKv), Budgets::PerRow(&per_row)),
            ("AdaKV", Some(Score::SnapKv), Budgets::AdaKv { base: 20, floor_alpha: 0.2 }),
            ("KNorm", Some(Score::KeyNorm), Budgets::PerRow(&per_row)),
            ("given", None, Budgets::PerRow(&per_row)),
        ] {
            let opts = SelectOptions {
                window: W,
                pool_kernel: 5,
                granularity,
                score: score.unwrap_or_default(),
                chunk_tokens: Some(chunk),
                ..SelectOptions::default()
            };
            let ctx = format!("{what}, {granularity:?}, d{d}, G{group}, {:?}", T::DTYPE);
            let mut ws = SelectWorkspace::new();
            let cache = match score {
                Some(_) => compress(store, &packed, budgets, &opts, &mut ws).unwrap(),
                None => {
                    let counts: Vec<u32> = (0..rows).map(|r| per_row[r].min(LENS[r / rps] as u32)).collect();
                    let mut l = LayoutBuilder::new(LENS.len(), rps);
                    for (r, &c) in counts.iter().enumerate() {
                        l = l.full(r / rps, r % rps, c);
                    }
                    let mut c = LayerCache::new(store, l.build().unwrap(), d).unwrap();
                    compress_into_scored(&mut c, &packed, &given_buf, budgets, &opts, &mut ws).unwrap();
                    c
                }
            };
            let (scores, kept, rows_p) =
                (ws.scores(store).unwrap(), ws.kept(store).unwrap(), rows_of(store, &cache));
            assert_eq!(scores.len(), prefix.iter().sum::<usize>(), "{ctx}: scores");
            assert_eq!(kept.len(), rows, "{ctx}: rows");
            let mut at = 0;
            for b in 0..LENS.len() {
                let seq_rows = b * rps..(b + 1) * rps;
                let n = LENS[b] - W;
                let budgets_b = match budgets {
                    Budgets::PerRow(p) => Budgets::PerRow(&p[seq_rows.clone()]),
                    ada => ada,
                };
                let mut ws_b = SelectWorkspace::new();
                let cache_b = match score {
                    Some(_) => compress(store, &alone_prompt(b), budgets_b, &opts, &mut ws_b).unwrap(),
                    None => {
                        let mut l = LayoutBuilder::new(1, rps);
                        for r in 0..rps {
                            l = l.full(0, r, per_row[b * rps + r].min(LENS[b] as u32));
                        }
                        let mut c = LayerCache::new(store, l.build().unwrap(), d).unwrap();
                        let g = store.upload(&given[at..at + rps * n]).unwrap();
                        compress_into_scored(&mut c, &alone_prompt(b), &g, budgets_b, &opts, &mut ws_b)
                            .unwrap();
                        c
                    }
                };
                let scores_b = ws_b.scores(store).unwrap();
                assert_eq!(
                    bits(&scores[at..at + rps * n]),
                    bits(&scores_b),
                    "{ctx}: sequence {b}'s scores differ from the sequence alone"
                );
                assert_eq!(
                    kept[seq_rows.clone()],
                    ws_b.kept(store).unwrap()[..],
                    "{ctx}: sequence {b}'s kept sets"
                );
                assert!(
                    rows_p[seq_rows.clone()] == rows_of(store, &cache_b)[..],
                    "{ctx}: sequence {b}'s kept rows"
                );
                // And the device scores against the f64 reference (computed scores only), with the
                // selection the reference makes over them.
                for (j, r) in seq_rows.clone().enumerate() {
                    let dev: Vec<f64> =
                        scores[at + j * n..at + (j + 1) * n].iter().map(|&x| f64::from(x)).collect();
                    let (h, heads_of) =
                        if per_seg > 1 { (j / group, j % group..j % group + 1) } else { (j, 0..group) };
                    let ks = &seqs[b].k[h * LENS[b] * d..(h + 1) * LENS[b] * d];
                    let want = match what {
                        "KNorm" => Some(reference::pool_scores(
                            &reference::knorm_scores(ks, d, W),
                            opts.pool_kernel,
                            opts.pool,
                        )),
                        "given" => None,
                        _ => {
                            let wq = seqs[b].window_queries(heads, d);
                            let qs =
                                &wq[(h * group + heads_of.start) * W * d..(h * group + heads_of.end) * W * d];
                            Some(reference::snapkv_scores(
                                ks,
                                qs,
                                d,
                                W,
                                opts.pool_kernel,
                                opts.pool,
                                opts.gqa,
                            ))
                        }
                    };
                    if let Some(want) = want {
                        let top = want.iter().copied().fold(0.0f64, f64::max);
                        for (t, (&a, &w)) in dev.iter().zip(&want).enumerate() {
                            assert!(
                                (a - w).abs() <= SCORE_TOL * top.max(1.0),
                                "{ctx}: row {r} token {t}: {a} vs reference {w}"
                            );
                        }
                    }
                    if let Budgets::PerRow(p) = budgets {
                        let sel = reference::select_positions(&dev, W, p[r] as usize);
                        let got: Vec<usize> = kept[r].iter().map(|&x| x as usize).collect();
                        assert_eq!(
                            got, sel,
                            "{ctx}: row {r}: kept set vs the reference selection over the same scores"
                        );
                    }
                }
                at += rps * n;
            }
        }
    }
    // Expected Attention over the same packed prompt: each sequence's scores as alone, bit for
    // bit, with and without the covariance.
    let mean = values_f32(seed ^ 0xEA, LENS.len() * heads * d, 0.5);
    let cov = values_f32(seed ^ 0xEB, LENS.len() * heads * d * d, 0.05);
    let (mean_buf, cov_buf) = (store.upload(&mean).unwrap(), store.upload(&cov).unwrap());
    let ea = ExpectedAttention { sink: 3, ..ExpectedAttention::default() };
    let total_prefix: usize = LENS.iter().map(|l| KV * (l - W)).sum();
    for with_cov in [false, true] {
        let mut out = store.zeros::<f32>(total_prefix).unwrap();
        let cov_p = with_cov.then_some(&cov_buf);
        scores::expected_attention(
            store,
            &packed,
            &mean_buf,
            cov_p,
            W,
            &ea,
            &mut out,
            &mut ScoreWorkspace::new(),
        )
        .unwrap();
        let got = store.download(&out).unwrap();
        let mut at = 0;
        for b in 0..LENS.len() {
            let n = KV * (LENS[b] - W);
            let m = store.upload(&mean[b * heads * d..(b + 1) * heads * d]).unwrap();
            let c = store.upload(&cov[b * heads * d * d..(b + 1) * heads * d * d]).unwrap();
            let mut out_b = store.zeros::<f32>(n).unwrap();
            scores::expected_attention(
                store,
                &alone_prompt(b),
                &m,
                with_cov.then_some(&c),
                W,
                &ea,
                &mut out_b,
                &mut ScoreWorkspace::new(),
            )
            .unwrap();
            assert_eq!(
                bits(&got[at..at + n]),
                bits(&store.download(&out_b).unwrap()),
                "Expected Attention (cov {with_cov}), d{d}, G{group}: sequence {b}"
            );
            at += n;
        }
    }
}
