//! The main job: Llama-3-8B-shaped layers (32 query heads, 8 KV heads, head_dim 128, bf16) with a
//! long prompt, kept as a full cache and as RLKV mixed caches (the heads with the lowest gates keep
//! 16 sink + 64 recent tokens, the rest everything), then a decode loop: append one token to every
//! segment, run decode attention, compare with the full cache. Prints KV bytes kept, attention
//! error against the full cache, needle tokens retained and time per step.
//!
//! Data: synthetic, with structure. Each prompt has a few "needle" tokens; a KV head whose gate is
//! high (a retrieval head, in DuoAttention's terms) has queries that seek the needles, the others
//! have queries that favour recent tokens. Gates come from RLKV's Llama-3.1-8B-R1 file when
//! ../shared/data is present, otherwise from a small synthetic gate table.
//!
//! Runs on the GPU when one is usable, otherwise through the CPU SIMT emulator at a smaller size;
//! it says which. Compression by score (SnapKV, PyramidKV, HeadKV, AdaKV) and R-KV land with their
//! kernels.

use half::bf16;
use headwise::policy::heads::{FullHeads, HeadGates, StreamingSize};
use headwise::{
    AttentionOptions, AttentionWorkspace, EmuStore, GpuStore, KvElem, LayerCache, LayerLayout, Segment,
    SegmentMode, Store,
};
use std::path::Path;
use std::time::Instant;

const KV_HEADS: usize = 8;
const GROUP: usize = 4;
const HEAD_DIM: usize = 128;
const NEEDLES: usize = 6;

struct Size {
    batch: usize,
    prompt: usize,
    steps: usize,
    layers: &'static [usize],
}

/// Deterministic pseudo-random numbers in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// One sequence's tokens for one KV head: K/V rows (f32, head_dim each) and needle positions.
struct HeadTokens {
    k: Vec<f32>,
    v: Vec<f32>,
    needles: Vec<usize>,
}

fn direction(seed: u64) -> Vec<f32> {
    let mut r = Rng(seed | 1);
    let v: Vec<f32> = (0..HEAD_DIM).map(|_| r.next()).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

fn key_row(
    rng: &mut Rng,
    t: usize,
    total: usize,
    needle: bool,
    needle_dir: &[f32],
    recent_dir: &[f32],
) -> Vec<f32> {
    // With queries of norm ~12 along a direction and the 1/sqrt(128) scale, a needle (10 along
    // the needle direction) gets a logit near 10, the newest token about the same through the
    // recency term, and unrelated tokens near 0: attention is peaked, as in real heads.
    let recency = 10.0 * (-((total - 1 - t) as f32) / 24.0).exp();
    (0..HEAD_DIM)
        .map(|j| 0.4 * rng.next() + if needle { 10.0 * needle_dir[j] } else { 0.0 } + recency * recent_dir[j])
        .collect()
}

fn prompt_tokens(seed: u64, prompt: usize) -> HeadTokens {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (nd, rd) = (direction(seed ^ 1), direction(seed ^ 2));
    let needles: Vec<usize> = (0..NEEDLES).map(|i| prompt / 10 + i * (prompt * 7 / 10) / NEEDLES).collect();
    let mut k = Vec::with_capacity(prompt * HEAD_DIM);
    let mut v = Vec::with_capacity(prompt * HEAD_DIM);
    for t in 0..prompt {
        k.extend(key_row(&mut rng, t, prompt, needles.contains(&t), &nd, &rd));
        v.extend((0..HEAD_DIM).map(|_| rng.next()));
    }
    HeadTokens { k, v, needles }
}

/// One layer's cache for `heads` (which KV heads keep everything), filled with the prompt;
/// also returns how many needle tokens it kept.
fn build_layer<S: Store>(
    store: &S,
    size: &Size,
    heads: &FullHeads,
    layer: usize,
    tokens: &[HeadTokens],
) -> headwise::Result<(LayerCache<S, bf16>, usize)> {
    let lens = vec![size.prompt as u32; size.batch];
    let planned = heads.layer_layout(layer, &lens, size.steps as u32, StreamingSize::RLKV)?;
    // Streaming segments hold the prompt's first `sink` and last `window` tokens.
    let segs: Vec<Segment> = planned
        .segments()
        .iter()
        .map(|s| match s.mode {
            SegmentMode::Streaming { .. } => Segment { len: s.capacity.min(size.prompt as u32), ..*s },
            SegmentMode::Full => *s,
        })
        .collect();
    let layout = LayerLayout::new(size.batch, KV_HEADS, planned.total_rows() as u64, segs)?;
    let mut retained = 0;
    let mut k = vec![bf16::ZERO; layout.total_rows() * HEAD_DIM];
    let mut v = k.clone();
    for (s, seg) in layout.segments().iter().enumerate() {
        let tok = &tokens[s];
        let kept: Vec<usize> = match seg.mode {
            SegmentMode::Full => (0..size.prompt).collect(),
            SegmentMode::Streaming { sink, window } => {
                let (sink, window) = (sink as usize, window as usize);
                (0..sink.min(size.prompt))
                    .chain(size.prompt.saturating_sub(window).max(sink)..size.prompt)
                    .collect()
            }
        };
        retained += tok.needles.iter().filter(|n| kept.contains(n)).count();
        for (i, &t) in kept.iter().enumerate() {
            let row = seg.row(i as u32) as usize * HEAD_DIM;
            for j in 0..HEAD_DIM {
                k[row + j] = bf16::from_f32(tok.k[t * HEAD_DIM + j]);
                v[row + j] = bf16::from_f32(tok.v[t * HEAD_DIM + j]);
            }
        }
    }
    let cache = LayerCache::from_parts(store, layout, HEAD_DIM, store.upload(&k)?, store.upload(&v)?)?;
    Ok((cache, retained))
}

struct Row {
    label: String,
    bytes: u64,
    err: f64,
    needles: (usize, usize),
    ms: f64,
}

const SPARSITIES: [f64; 3] = [0.2, 0.5, 0.8];

fn run<S: Store>(store: &S, size: Size, gates: &HeadGates, sync: &dyn Fn(&S)) -> headwise::Result<()> {
    println!(
        "model: Llama-3-8B shapes ({} q heads, {KV_HEADS} KV heads, head_dim {HEAD_DIM}, bf16), layers {:?} of {}, \
         batch {}, prompt {} tokens, {} decode steps",
        KV_HEADS * GROUP,
        size.layers,
        gates.layers(),
        size.batch,
        size.prompt,
        size.steps
    );
    // Retrieval heads: the top quarter of all gates (DuoAttention's premise: high gate = needs
    // the whole context). Their queries seek needles; the other heads' favour recent tokens.
    let retrieval = gates.select_full(0.75)?;
    let n = size.batch * KV_HEADS;
    let mut rows: Vec<Row> = std::iter::once("full cache".to_string())
        .chain(SPARSITIES.iter().map(|s| format!("RLKV mix, sparsity {s} (16+64)")))
        .map(|label| Row { label, bytes: 0, err: 0.0, needles: (0, 0), ms: 0.0 })
        .collect();
    let mut err_n = 0usize;
    for &layer in size.layers {
        let tokens: Vec<HeadTokens> =
            (0..n).map(|s| prompt_tokens((layer * 1000 + s) as u64, size.prompt)).collect();
        let mut caches: Vec<LayerCache<S, bf16>> = Vec::new();
        let all = FullHeads::all_full(gates.layers(), KV_HEADS);
        for (i, heads) in
            std::iter::once(all).chain(SPARSITIES.iter().map(|&s| gates.select_full(s))).enumerate()
        {
            let (cache, retained) = build_layer(store, &size, &heads?, layer, &tokens)?;
            rows[i].needles.0 += retained;
            rows[i].needles.1 += n * NEEDLES;
            caches.push(cache);
        }
        let mut ws: Vec<AttentionWorkspace<S>> = caches.iter().map(|_| AttentionWorkspace::new()).collect();
        let mut outs = Vec::new();
        for _ in &caches {
            outs.push(store.zeros::<bf16>(n * GROUP * HEAD_DIM)?);
        }
        let mut rng = Rng(layer as u64 + 77);
        for step in 0..size.steps {
            let total = size.prompt + step + 1;
            let mut knew = Vec::with_capacity(n * HEAD_DIM);
            let mut vnew = Vec::with_capacity(n * HEAD_DIM);
            let mut q = Vec::with_capacity(n * GROUP * HEAD_DIM);
            for s in 0..n {
                let seed = (layer * 1000 + s) as u64;
                let (nd, rd) = (direction(seed ^ 1), direction(seed ^ 2));
                knew.extend(
                    key_row(&mut rng, total - 1, total, false, &nd, &rd).into_iter().map(bf16::from_f32),
                );
                vnew.extend((0..HEAD_DIM).map(|_| bf16::from_f32(rng.next())));
                let dir = if retrieval.is_full(layer, s % KV_HEADS) { &nd } else { &rd };
                for _ in 0..GROUP {
                    q.extend((0..HEAD_DIM).map(|j| bf16::from_f32(12.0 * dir[j] + 0.3 * rng.next())));
                }
            }
            let (dk, dv, dq) = (store.upload(&knew)?, store.upload(&vnew)?, store.upload(&q)?);
            for (i, cache) in caches.iter_mut().enumerate() {
                sync(store);
                let t = Instant::now();
                cache.append(&dk, &dv)?;
                cache.attention(&dq, GROUP, &mut outs[i], None, &mut ws[i], &AttentionOptions::default())?;
                sync(store);
                rows[i].ms += t.elapsed().as_secs_f64() * 1e3;
            }
            let reference = store.download(&outs[0])?;
            for (i, out) in outs.iter().enumerate().skip(1) {
                let got = store.download(out)?;
                for h in 0..n * GROUP {
                    let r = &reference[h * HEAD_DIM..(h + 1) * HEAD_DIM];
                    let m = &got[h * HEAD_DIM..(h + 1) * HEAD_DIM];
                    let e: f64 = r
                        .iter()
                        .zip(m)
                        .map(|(x, y)| (f64::from(x.to_f32()) - f64::from(y.to_f32())).powi(2))
                        .sum();
                    let nr: f64 = r.iter().map(|x| f64::from(x.to_f32()).powi(2)).sum();
                    rows[i].err += (e / nr.max(1e-30)).sqrt();
                }
            }
            err_n += n * GROUP;
            eprint!(".");
        }
        for (row, cache) in rows.iter_mut().zip(&caches) {
            row.bytes += 2 * cache.layout().rows_in_use() * (HEAD_DIM * bf16::DTYPE.size()) as u64;
        }
    }
    eprintln!();
    let steps = (size.steps * size.layers.len()) as f64;
    let full_bytes = rows[0].bytes;
    println!(
        "{:<34} {:>14} {:>8} {:>14} {:>10} {:>12}",
        "method", "KV bytes", "kept", "attn rel err", "needles", "ms/step"
    );
    for r in &rows {
        println!(
            "{:<34} {:>14} {:>7.1}% {:>14.2e} {:>4}/{:<5} {:>12.3}",
            r.label,
            r.bytes,
            100.0 * r.bytes as f64 / full_bytes as f64,
            r.err / err_n as f64,
            r.needles.0,
            r.needles.1,
            r.ms / steps
        );
    }
    println!(
        "attn rel err: mean over query heads and steps of |o - o_full| / |o_full|. ms/step: append + attention, per \
         layer, host timing{}.",
        if std::any::type_name::<S>().contains("Emu") {
            " of the CPU emulator (not GPU speed)"
        } else {
            " around a synchronize"
        }
    );
    Ok(())
}

fn gates() -> headwise::Result<HeadGates> {
    let real =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/head-scores/rlkv/Llama-3.1-8B-R1.tsv");
    if real.is_file() {
        println!("gates: RLKV {}", real.display());
        return HeadGates::load(real);
    }
    println!("gates: synthetic (../shared/data not found)");
    let mut r = Rng(5);
    let text: String = (0..32)
        .map(|_| {
            (0..KV_HEADS).map(|_| format!("{:.3}", (r.next() + 1.0) / 2.0)).collect::<Vec<_>>().join("\t")
                + "\n"
        })
        .collect();
    HeadGates::parse_tsv(&text)
}

fn main() -> headwise::Result<()> {
    let gates = gates()?;
    match GpuStore::new(0) {
        Ok(gpu) => {
            println!("device: GPU (CUDA device 0)");
            let size = Size { batch: 4, prompt: 32768, steps: 16, layers: &[0, 8, 16, 24, 31] };
            run(&gpu, size, &gates, &|s: &GpuStore| s.synchronize().unwrap())
        }
        Err(why) => {
            println!("device: CPU SIMT emulator, reduced size ({why})");
            let size = Size { batch: 1, prompt: 2048, steps: 4, layers: &[0, 16, 31] };
            run(&EmuStore, size, &gates, &|_| {})
        }
    }
}
