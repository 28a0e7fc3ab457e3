//! Writes the JSON fixture that `benches/peers/test_peers.py` checks the peers' formulations
//! against: small inputs (f16-representable values) and the crate's CPU reference outputs
//! (`headwise::reference`): SnapKV-family scores and kept positions, AdaKV budgets and kept
//! positions, R-KV importance / redundancy / scores / kept positions, and decode attention
//! output and LSE over ragged segments.
//!
//! `cargo run --example peer_fixtures -- OUT.json` (default `target/peer_fixtures.json`).

use half::f16;
use headwise::LayoutBuilder;
use headwise::reference::rkv::{RkvOptions, rkv_importance, rkv_redundancy, rkv_scores, rkv_select};
use headwise::reference::{self, GqaReduce, Pool};
use serde_json::{Value, json};

/// Deterministic values in [-1, 1), rounded to f16 (so f32/f64 readers see the exact inputs).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f16 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        f16::from_f32(((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
    }
    fn vec(&mut self, n: usize) -> Vec<f16> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn floats(x: &[f16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

fn pool_name(p: Pool) -> &'static str {
    if p == Pool::Max { "max" } else { "avg" }
}

fn gqa_name(g: GqaReduce) -> &'static str {
    if g == GqaReduce::Mean { "mean" } else { "max" }
}

#[allow(clippy::too_many_arguments)]
fn snapkv_case(
    name: &str,
    k: Vec<f16>,
    queries: Vec<f16>,
    head_dim: usize,
    window: usize,
    kernel: usize,
    pool: Pool,
    gqa: GqaReduce,
    budget: usize,
) -> Value {
    let scores = reference::snapkv_scores(&k, &queries, head_dim, window, kernel, pool, gqa);
    let kept = reference::select_positions(&scores, window, budget);
    json!({
        "name": name, "head_dim": head_dim, "window": window, "kernel": kernel,
        "pool": pool_name(pool), "gqa": gqa_name(gqa), "budget": budget,
        "group": queries.len() / (window * head_dim), "q": k.len() / head_dim,
        "k": floats(&k), "queries": floats(&queries), "scores": scores, "kept": kept,
    })
}

fn snapkv_cases(rng: &mut Rng) -> Vec<Value> {
    let mut out = Vec::new();
    for (i, (q, d, w, g, kernel, pool, gqa, budget)) in [
        (96, 16, 8, 4, 7, Pool::Max, GqaReduce::Mean, 40),
        (80, 16, 8, 2, 7, Pool::Avg, GqaReduce::Mean, 30),
        (70, 8, 4, 3, 5, Pool::Max, GqaReduce::Max, 20),
        (64, 8, 8, 1, 1, Pool::Max, GqaReduce::Mean, 24),
        (50, 8, 8, 2, 7, Pool::Max, GqaReduce::Mean, 200),
    ]
    .into_iter()
    .enumerate()
    {
        let (k, qs) = (rng.vec(q * d), rng.vec(g * w * d));
        out.push(snapkv_case(&format!("random{i}"), k, qs, d, w, kernel, pool, gqa, budget));
    }
    // Exact ties: every key the same, exactly representable products, so every score is equal
    // in any summation order and the lowest positions must win.
    let (q, d, w, g) = (40, 8, 4, 2);
    let k = vec![f16::from_f32(0.5); q * d];
    let qs = vec![f16::from_f32(0.25); g * w * d];
    out.push(snapkv_case("all_tied", k, qs, d, w, 7, Pool::Max, GqaReduce::Mean, 12));
    out
}

fn adakv_cases(rng: &mut Rng) -> Vec<Value> {
    let mut out = Vec::new();
    for (q, d, w, g, heads, base, alpha) in [(90, 16, 8, 2, 4, 24, 0.2f32), (60, 8, 4, 4, 3, 14, 0.5)] {
        let k: Vec<Vec<f16>> = (0..heads).map(|_| rng.vec(q * d)).collect();
        let qs: Vec<Vec<f16>> = (0..heads).map(|_| rng.vec(g * w * d)).collect();
        let scores: Vec<Vec<f64>> = (0..heads)
            .map(|h| reference::snapkv_scores(&k[h], &qs[h], d, w, 7, Pool::Max, GqaReduce::Mean))
            .collect();
        let budgets = reference::adakv_budgets(&scores, w, base, alpha);
        let kept: Vec<Vec<usize>> =
            (0..heads).map(|h| reference::select_positions(&scores[h], w, budgets[h])).collect();
        out.push(json!({
            "head_dim": d, "window": w, "kernel": 7, "pool": "max", "gqa": "mean", "group": g,
            "kv_heads": heads, "q": q, "base": base, "floor_alpha": alpha,
            "k": k.iter().map(|x| floats(x)).collect::<Vec<_>>(),
            "queries": qs.iter().map(|x| floats(x)).collect::<Vec<_>>(),
            "scores": scores, "budgets": budgets, "kept": kept,
        }));
    }
    out
}

fn rkv_cases(rng: &mut Rng) -> Vec<Value> {
    let mut out = Vec::new();
    for (len, d, g, nq, budget, quirk) in
        [(60, 16, 2, 8, 30, false), (45, 8, 4, 5, 20, true), (30, 8, 1, 8, 12, false)]
    {
        let mut k = rng.vec(len * d);
        // Planted near-duplicates (cosine > 0.5) so the redundancy term matters.
        for (src, dst) in [(3, 10), (3, 25), (7, 8)] {
            for e in 0..d {
                k[dst * d + e] = k[src * d + e];
            }
        }
        let queries = rng.vec(g * nq * d);
        let opts = RkvOptions { fidelity_quirk: quirk, ..RkvOptions::new(budget) };
        let importance = rkv_importance(&k, &queries, g, d, opts.alpha, opts.kernel);
        let redundancy = rkv_redundancy(&k, d, quirk);
        let scores = rkv_scores(&k, &queries, g, d, &opts);
        let kept = rkv_select(&scores, opts.alpha, budget);
        out.push(json!({
            "len": len, "head_dim": d, "group": g, "nq": nq, "alpha": opts.alpha,
            "kernel": opts.kernel, "lambda": opts.lambda, "fidelity_quirk": quirk, "budget": budget,
            "k": floats(&k), "queries": floats(&queries), "importance": importance,
            "redundancy": redundancy, "scores": scores, "kept": kept,
        }));
    }
    out
}

fn attention_cases(rng: &mut Rng) -> Vec<Value> {
    let mut out = Vec::new();
    for (lens, d, g) in [(vec![1u32, 5, 17, 40], 16usize, 4usize), (vec![9, 3], 8, 1)] {
        let mut b = LayoutBuilder::new(1, lens.len());
        for (h, &len) in lens.iter().enumerate() {
            b = b.full(0, h, len);
        }
        let layout = b.build().unwrap();
        let (k, v) = (rng.vec(layout.total_rows() * d), rng.vec(layout.total_rows() * d));
        let q = rng.vec(lens.len() * g * d);
        let scale = 1.0 / (d as f64).sqrt();
        let (o, lse) = reference::attention(&layout, d, &k, &v, &q, g, scale);
        let rows = |buf: &[f16], s: usize| -> Vec<f32> {
            reference::token_rows(&layout, s)
                .iter()
                .flat_map(|&r| floats(&buf[r as usize * d..(r as usize + 1) * d]))
                .collect()
        };
        out.push(json!({
            "lens": lens, "head_dim": d, "group": g, "scale": scale,
            "k": (0..lens.len()).map(|s| rows(&k, s)).collect::<Vec<_>>(),
            "v": (0..lens.len()).map(|s| rows(&v, s)).collect::<Vec<_>>(),
            "q": floats(&q), "out": o, "lse": lse,
        }));
    }
    out
}

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| "target/peer_fixtures.json".into());
    let mut rng = Rng(0x2545F4914F6CDD1D);
    let fixture = json!({
        "about": "headwise CPU reference outputs (src/reference) for benches/peers/test_peers.py",
        "snapkv": snapkv_cases(&mut rng),
        "adakv": adakv_cases(&mut rng),
        "rkv": rkv_cases(&mut rng),
        "attention": attention_cases(&mut rng),
    });
    if let Some(dir) = std::path::Path::new(&path).parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&path, serde_json::to_string(&fixture).unwrap()).unwrap();
    eprintln!("peer fixtures: {path}");
}
