//! The main job: Llama-3-8B-shaped layers (32 query heads, 8 KV heads, head_dim 128, bf16) with a
//! long prompt, compressed with every method of the crate, then a decode loop (append one token
//! to every segment, decode attention) compared with the full cache. Prints, per method, the KV
//! bytes kept, the attention-output error against the full cache over the decode steps, the
//! needle tokens retained, the one-time compression time and the time per decode step.
//!
//! Methods: SnapKV (uniform budget), KNorm and Expected Attention (kvpress's scores, uniform
//! budget), PyramidKV (per-layer budgets), HeadKV-R2 (per-head budgets
//! from the authors' Llama-3-8B score file when ../shared/data is present, else synthetic
//! scores), AdaKV (budgets allocated on the device), R-KV (eviction during the decode, from the
//! full prompt), H2O (attention mass accumulated by the decode attention, eviction by it), and
//! RLKV mixed heads (Full + 16 sink/64 recent Streaming heads from RLKV's
//! Llama-3.1-8B-R1 gate file, else synthetic gates).
//!
//! Data: synthetic, with structure. Each prompt has a few "needle" tokens and a strong recency
//! trend; a KV head whose gate is high (a retrieval head) has queries that seek the needles,
//! the others have queries that favour recent tokens.
//!
//! Runs on the GPU when one is usable, otherwise through the CPU SIMT emulator at a smaller size;
//! it says which.

use half::bf16;
use headwise::heavy_hitters::{H2oOptions, H2oWorkspace, evict_by_mass};
use headwise::policy::budget::{self, HeadKvOptions};
use headwise::policy::head_scores::HeadScores;
use headwise::policy::heads::{FullHeads, HeadGates, StreamingSize};
use headwise::redundancy::{QueryRing, RkvOptions, RkvTrigger, RkvWorkspace, evict};
use headwise::scores::{self, ExpectedAttention, ScoreWorkspace};
use headwise::select::{
    Budgets, Packing, Prompt, Score, SelectOptions, SelectWorkspace, compress, compress_into_scored,
};
use headwise::{
    AttentionOptions, AttentionWorkspace, EmuStore, GpuStore, KvElem, LayerCache, LayerLayout, LayoutBuilder,
    Segment, SegmentMode, Store,
};
use std::path::Path;
use std::time::Instant;

const KV_HEADS: usize = 8;
const GROUP: usize = 4;
const HEAD_DIM: usize = 128;
const NEEDLES: usize = 6;
const MODEL_LAYERS: usize = 32;
const WINDOW: usize = 32;

struct Size {
    batch: usize,
    prompt: usize,
    steps: usize,
    layers: &'static [usize],
    /// Average tokens kept per KV head by the score-based methods (window included).
    budget: u32,
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
    prefill_ms: Option<f64>,
    ms: f64,
}

/// What every method sees for one layer: the prompt per segment, the last WINDOW queries of
/// every query head, and the decode steps' inputs.
struct LayerData {
    tokens: Vec<HeadTokens>,
    /// `[segments][G][WINDOW][HEAD_DIM]`.
    window_q: Vec<bf16>,
    /// Per step: new K rows, new V rows (`[segments][D]`) and queries (`[segments * G][D]`).
    steps: Vec<(Vec<bf16>, Vec<bf16>, Vec<bf16>)>,
}

fn query_row(rng: &mut Rng, dir: &[f32]) -> impl Iterator<Item = bf16> {
    let noise: Vec<f32> = (0..HEAD_DIM).map(|_| 0.3 * rng.next()).collect();
    (0..HEAD_DIM).map(move |j| bf16::from_f32(12.0 * dir[j] + noise[j])).collect::<Vec<_>>().into_iter()
}

fn layer_data(size: &Size, layer: usize, retrieval: &FullHeads) -> LayerData {
    let n = size.batch * KV_HEADS;
    let tokens: Vec<HeadTokens> =
        (0..n).map(|s| prompt_tokens((layer * 1000 + s) as u64, size.prompt)).collect();
    let mut rng = Rng(layer as u64 + 77);
    let dirs: Vec<(Vec<f32>, Vec<f32>)> = (0..n)
        .map(|s| {
            let seed = (layer * 1000 + s) as u64;
            (direction(seed ^ 1), direction(seed ^ 2))
        })
        .collect();
    let seeks = |s: usize| -> &[f32] {
        let (nd, rd) = &dirs[s];
        if retrieval.is_full(layer, s % KV_HEADS) { nd } else { rd }
    };
    let mut window_q = Vec::with_capacity(n * GROUP * WINDOW * HEAD_DIM);
    for s in 0..n {
        for _ in 0..GROUP * WINDOW {
            window_q.extend(query_row(&mut rng, seeks(s)));
        }
    }
    let steps = (0..size.steps)
        .map(|step| {
            let total = size.prompt + step + 1;
            let (mut k, mut v, mut q) = (Vec::new(), Vec::new(), Vec::new());
            for (s, (nd, rd)) in dirs.iter().enumerate() {
                k.extend(key_row(&mut rng, total - 1, total, false, nd, rd).into_iter().map(bf16::from_f32));
                v.extend((0..HEAD_DIM).map(|_| bf16::from_f32(rng.next())));
                for _ in 0..GROUP {
                    q.extend(query_row(&mut rng, seeks(s)));
                }
            }
            (k, v, q)
        })
        .collect();
    LayerData { tokens, window_q, steps }
}

/// The score-based prefill methods.
#[derive(Clone, Copy)]
enum Prefill {
    Snap,
    Pyramid,
    HeadKv,
    AdaKv,
    /// kvpress's KNorm: -||k|| scores (no queries), uniform budget, no pooling.
    KNorm,
    /// kvpress's Expected Attention: the query mean and covariance (here of the observation
    /// window's queries, per query head) score every key; uniform budget, no pooling.
    ExpectedAttention,
}

/// A method's layer cache at the start of decoding. R-KV also carries its query ring, its
/// workspace and the prompt position of every cached token (for the needle count); H2O its
/// mass buffer, workspace and positions.
struct Decoding<S: Store> {
    cache: LayerCache<S, bf16>,
    rkv: Option<RkvState<S>>,
    h2o: Option<H2oState<S>>,
}

/// H2O's accumulated mass (one f32 per cache row), workspace, and the prompt/decode position of
/// every cached token per segment.
type H2oState<S> = (<S as Store>::Buf<f32>, H2oWorkspace<S>, Vec<Vec<usize>>);

/// Prompt queries per head that seed H2O's mass before decoding (the authors accumulate over the
/// whole prefill; the last few queries stand in for it here, as R-KV's ring does).
const H2O_SEED_QUERIES: usize = 8;

/// Applies an eviction's kept positions (per compacted segment) to the token positions.
fn keep_positions(positions: &mut [Vec<usize>], kept: Vec<(usize, Vec<u32>)>) {
    for (s, kept) in kept {
        let before = &positions[s];
        positions[s] = kept.iter().map(|&i| before[i as usize]).collect();
    }
}

/// R-KV's ring, workspace, and the prompt/decode position of every cached token per segment.
type RkvState<S> = (QueryRing<S, bf16>, RkvWorkspace<S>, Vec<Vec<usize>>);

fn compress_layer<S: Store>(
    store: &S,
    size: &Size,
    data: &LayerData,
    layer: usize,
    method: Prefill,
    headkv_caps: &[u32],
) -> headwise::Result<(LayerCache<S, bf16>, usize)> {
    let n = size.batch * KV_HEADS;
    let flat = |f: fn(&HeadTokens) -> &Vec<f32>| -> Vec<bf16> {
        data.tokens.iter().flat_map(|t| f(t).iter().map(|&x| bf16::from_f32(x))).collect()
    };
    let (k, v) = (store.upload(&flat(|t| &t.k))?, store.upload(&flat(|t| &t.v))?);
    let queries = store.upload(&data.window_q)?;
    let prompt = Prompt {
        k: &k,
        v: &v,
        queries: &queries,
        batch: size.batch,
        kv_heads: KV_HEADS,
        group_size: GROUP,
        q_len: size.prompt,
        head_dim: HEAD_DIM,
        packing: Packing::HeadMajor,
    };
    let per_row: Vec<u32> = match method {
        Prefill::Snap | Prefill::KNorm | Prefill::ExpectedAttention => {
            vec![budget::uniform(size.budget, WINDOW as u32)?; n]
        }
        Prefill::Pyramid => {
            let layers = budget::pyramid(size.budget, WINDOW as u32, MODEL_LAYERS, size.prompt as u32, 20)?;
            vec![layers[layer]; n]
        }
        Prefill::HeadKv => (0..n).map(|s| headkv_caps[layer * KV_HEADS + s % KV_HEADS]).collect(),
        Prefill::AdaKv => Vec::new(),
    };
    let budgets = match method {
        Prefill::AdaKv => Budgets::AdaKv { base: size.budget, floor_alpha: 0.2 },
        _ => Budgets::PerRow(&per_row),
    };
    let mut opts = SelectOptions { window: WINDOW, headroom: size.steps as u32, ..SelectOptions::default() };
    if let Prefill::KNorm = method {
        (opts.score, opts.pool_kernel) = (Score::KeyNorm, 1);
    }
    let mut ws = SelectWorkspace::new();
    let cache = if let Prefill::ExpectedAttention = method {
        opts.pool_kernel = 1;
        // Query statistics per query head from its window queries (the demo's layers have no
        // RoPE to average over future positions, which kvpress does before this step).
        let d = HEAD_DIM;
        let (mut mean, mut cov) = (vec![0.0f32; n * GROUP * d], vec![0.0f32; n * GROUP * d * d]);
        for h in 0..n * GROUP {
            let q = |i: usize, j: usize| data.window_q[(h * WINDOW + i) * d + j].to_f32();
            for j in 0..d {
                mean[h * d + j] = (0..WINDOW).map(|i| q(i, j)).sum::<f32>() / WINDOW as f32;
            }
            for a in 0..d {
                for b in 0..d {
                    let c: f32 =
                        (0..WINDOW).map(|i| (q(i, a) - mean[h * d + a]) * (q(i, b) - mean[h * d + b])).sum();
                    cov[(h * d + a) * d + b] = c / WINDOW as f32;
                }
            }
        }
        let (mean, cov) = (store.upload(&mean)?, store.upload(&cov)?);
        let mut scores = store.zeros::<f32>(n * (size.prompt - WINDOW))?;
        let ea = ExpectedAttention::default();
        scores::expected_attention(
            store,
            &prompt,
            &mean,
            Some(&cov),
            WINDOW,
            &ea,
            &mut scores,
            &mut ScoreWorkspace::new(),
        )?;
        let mut layout = LayoutBuilder::new(size.batch, KV_HEADS).headroom(size.steps as u32);
        for (s, &budget) in per_row.iter().enumerate().take(n) {
            layout = layout.full(s / KV_HEADS, s % KV_HEADS, (budget as usize).min(size.prompt) as u32);
        }
        let mut cache = LayerCache::new(store, layout.build()?, HEAD_DIM)?;
        compress_into_scored(&mut cache, &prompt, &scores, budgets, &opts, &mut ws)?;
        cache
    } else {
        compress(store, &prompt, budgets, &opts, &mut ws)?
    };
    let kept = ws.kept(store)?;
    let retained = kept
        .iter()
        .zip(&data.tokens)
        .map(|(k, t)| t.needles.iter().filter(|&&p| k.contains(&(p as u32))).count())
        .sum();
    Ok((cache, retained))
}

const SPARSITIES: [f64; 3] = [0.2, 0.5, 0.8];

fn run<S: Store>(
    store: &S,
    size: Size,
    gates: &HeadGates,
    headkv: &HeadScores,
    sync: &dyn Fn(&S),
) -> headwise::Result<()> {
    println!(
        "model: Llama-3-8B shapes ({} q heads, {KV_HEADS} KV heads, head_dim {HEAD_DIM}, bf16), layers {:?} of \
         {MODEL_LAYERS}, batch {}, prompt {} tokens, budget {} tokens per KV head (window {WINDOW}), {} decode steps",
        KV_HEADS * GROUP,
        size.layers,
        size.batch,
        size.prompt,
        size.budget,
        size.steps
    );
    // Retrieval heads: the top quarter of all gates (DuoAttention's premise: high gate = needs
    // the whole context). Their queries seek needles; the other heads' favour recent tokens.
    let retrieval = gates.select_full(0.75)?;
    let headkv_caps = budget::headkv(
        headkv.to_kv_heads(KV_HEADS)?.as_slice(),
        size.budget,
        WINDOW as u32,
        &HeadKvOptions::default(),
    )?;
    let rkv_opts = RkvOptions::new(size.budget as usize);
    let h2o_opts = H2oOptions { budget: size.budget as usize, recent: WINDOW };
    let n = size.batch * KV_HEADS;
    let labels: Vec<String> = [
        "full cache",
        "SnapKV",
        "PyramidKV",
        "HeadKV-R2",
        "AdaKV",
        "KNorm (-|k|, uniform)",
        "Expected Attention (uniform)",
        "R-KV (evicts while decoding)",
        "H2O (accumulated mass)",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(SPARSITIES.iter().map(|s| format!("RLKV mix, sparsity {s} (16+64)")))
    .collect();
    let mut rows: Vec<Row> = labels
        .into_iter()
        .map(|label| Row { label, bytes: 0, err: 0.0, needles: (0, 0), prefill_ms: None, ms: 0.0 })
        .collect();
    let mut err_n = 0usize;
    for &layer in size.layers {
        eprint!("layer {layer}: prefill");
        let data = layer_data(&size, layer, &retrieval);
        let all = FullHeads::all_full(gates.layers(), KV_HEADS)?;
        let mut methods: Vec<Decoding<S>> = Vec::new();
        let mut add = |row: &mut Row, cache, retained: usize, prefill: Option<f64>, rkv, h2o| {
            row.needles.0 += retained;
            row.needles.1 += n * NEEDLES;
            if let Some(ms) = prefill {
                *row.prefill_ms.get_or_insert(0.0) += ms;
            }
            methods.push(Decoding { cache, rkv, h2o });
        };
        let (full, retained) = build_layer(store, &size, &all, layer, &data.tokens)?;
        add(&mut rows[0], full, retained, None, None, None);
        for (i, m) in [
            Prefill::Snap,
            Prefill::Pyramid,
            Prefill::HeadKv,
            Prefill::AdaKv,
            Prefill::KNorm,
            Prefill::ExpectedAttention,
        ]
        .into_iter()
        .enumerate()
        {
            sync(store);
            let t = Instant::now();
            let (cache, retained) = compress_layer(store, &size, &data, layer, m, &headkv_caps)?;
            sync(store);
            add(&mut rows[1 + i], cache, retained, Some(t.elapsed().as_secs_f64() * 1e3), None, None);
            eprint!(".");
        }
        // R-KV: the full prompt, then evictions during the decode. The ring starts with the
        // prompt's last alpha queries, as the authors seed it.
        let (cache, _) = build_layer(store, &size, &all, layer, &data.tokens)?;
        let mut ring = QueryRing::new(store, n * GROUP, rkv_opts.alpha, HEAD_DIM)?;
        for i in WINDOW - rkv_opts.alpha..WINDOW {
            let q: Vec<bf16> = (0..n * GROUP)
                .flat_map(|h| {
                    data.window_q[(h * WINDOW + i) * HEAD_DIM..(h * WINDOW + i + 1) * HEAD_DIM].to_vec()
                })
                .collect();
            ring.push(&store.upload(&q)?)?;
        }
        let positions = vec![(0..size.prompt).collect::<Vec<usize>>(); n];
        add(&mut rows[7], cache, 0, None, Some((ring, RkvWorkspace::new(), positions)), None);
        // H2O: the full prompt, its mass seeded by the prompt's last queries (each attends over the
        // whole prompt, a decode-style step), then evicted to the budget by mass; during the
        // decode the attention accumulates mass and each step evicts back to the budget.
        let (cache, _) = build_layer(store, &size, &all, layer, &data.tokens)?;
        sync(store);
        let t = Instant::now();
        let mut mass = store.zeros::<f32>(cache.layout().total_rows())?;
        let mut seed_ws = AttentionWorkspace::new();
        let mut seed_out = store.zeros::<bf16>(n * GROUP * HEAD_DIM)?;
        for i in WINDOW - H2O_SEED_QUERIES..WINDOW {
            let q: Vec<bf16> = (0..n * GROUP)
                .flat_map(|h| {
                    data.window_q[(h * WINDOW + i) * HEAD_DIM..(h * WINDOW + i + 1) * HEAD_DIM].to_vec()
                })
                .collect();
            let opts = AttentionOptions::default();
            cache.attention_with_mass(
                &store.upload(&q)?,
                GROUP,
                &mut seed_out,
                None,
                &mut seed_ws,
                &opts,
                &mut mass,
            )?;
        }
        let mut cache = cache;
        let mut hws = H2oWorkspace::new();
        evict_by_mass(&mut cache, &mut mass, &h2o_opts, &mut hws)?;
        let mut positions = vec![(0..size.prompt).collect::<Vec<usize>>(); n];
        keep_positions(&mut positions, hws.kept(store)?);
        sync(store);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        add(&mut rows[8], cache, 0, Some(ms), None, Some((mass, hws, positions)));
        for (i, &sp) in SPARSITIES.iter().enumerate() {
            let (cache, retained) = build_layer(store, &size, &gates.select_full(sp)?, layer, &data.tokens)?;
            add(&mut rows[9 + i], cache, retained, None, None, None);
        }
        eprint!(" decode");

        let mut ws: Vec<AttentionWorkspace<S>> = methods.iter().map(|_| AttentionWorkspace::new()).collect();
        let mut outs = Vec::new();
        for _ in &methods {
            outs.push(store.zeros::<bf16>(n * GROUP * HEAD_DIM)?);
        }
        for (step, (knew, vnew, q)) in data.steps.iter().enumerate() {
            let (dk, dv, dq) = (store.upload(knew)?, store.upload(vnew)?, store.upload(q)?);
            for (i, m) in methods.iter_mut().enumerate() {
                sync(store);
                let t = Instant::now();
                m.cache.append(&dk, &dv)?;
                if let Some((ring, rws, positions)) = &mut m.rkv {
                    for p in positions.iter_mut() {
                        p.push(size.prompt + step);
                    }
                    ring.push(&dq)?;
                    let done = evict(&mut m.cache, ring, GROUP, &rkv_opts, RkvTrigger::Threshold, rws)?;
                    if done.iter().any(|&d| d) {
                        keep_positions(positions, rws.kept(store)?);
                    }
                }
                let opts = AttentionOptions::default();
                if let Some((mass, hws, positions)) = &mut m.h2o {
                    for p in positions.iter_mut() {
                        p.push(size.prompt + step);
                    }
                    m.cache.attention_with_mass(&dq, GROUP, &mut outs[i], None, &mut ws[i], &opts, mass)?;
                    evict_by_mass(&mut m.cache, mass, &h2o_opts, hws)?;
                    keep_positions(positions, hws.kept(store)?);
                } else {
                    m.cache.attention(&dq, GROUP, &mut outs[i], None, &mut ws[i], &opts)?;
                }
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
        let needles = |positions: &[Vec<usize>]| -> usize {
            positions
                .iter()
                .zip(&data.tokens)
                .map(|(p, t)| t.needles.iter().filter(|x| p.contains(x)).count())
                .sum()
        };
        if let Some((_, _, positions)) = &methods[7].rkv {
            rows[7].needles.0 += needles(positions);
        }
        if let Some((_, _, positions)) = &methods[8].h2o {
            rows[8].needles.0 += needles(positions);
        }
        for (row, m) in rows.iter_mut().zip(&methods) {
            row.bytes += 2 * m.cache.layout().rows_in_use() * (HEAD_DIM * bf16::DTYPE.size()) as u64;
        }
        eprintln!();
    }
    let steps = (size.steps * size.layers.len()) as f64;
    let full_bytes = rows[0].bytes;
    println!(
        "{:<32} {:>13} {:>7} {:>13} {:>10} {:>13} {:>11}",
        "method", "KV bytes", "kept", "attn rel err", "needles", "prefill ms/L", "ms/step/L"
    );
    for r in &rows {
        println!(
            "{:<32} {:>13} {:>6.1}% {:>13.2e} {:>4}/{:<5} {:>13} {:>11.3}",
            r.label,
            r.bytes,
            100.0 * r.bytes as f64 / full_bytes as f64,
            r.err / err_n as f64,
            r.needles.0,
            r.needles.1,
            r.prefill_ms.map_or("-".to_string(), |ms| format!("{:.1}", ms / size.layers.len() as f64)),
            r.ms / steps
        );
    }
    println!(
        "KV bytes: K + V rows in use after the decode steps. attn rel err: mean over query heads and steps of \
         |o - o_full| / |o_full|. needles: needle tokens still cached. prefill ms/L: compression of the prompt, \
         per layer (H2O: mass seeded by the prompt's last {H2O_SEED_QUERIES} queries, then evicted). ms/step/L: append + \
         attention (+ ring push and eviction for R-KV; + mass and eviction for H2O) per layer; host timing{}.",
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

fn headkv_scores() -> headwise::Result<HeadScores> {
    let real = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/head-scores/headkv/Meta-Llama-3-8B-Instruct_retrieval_reasoning_heads.json");
    if real.is_file() {
        println!("head scores: HeadKV-R2 {}", real.display());
        return HeadScores::load(real);
    }
    println!("head scores: synthetic (../shared/data not found)");
    let mut r = Rng(9);
    let entries: Vec<String> = (0..MODEL_LAYERS)
        .flat_map(|l| (0..KV_HEADS * GROUP).map(move |h| (l, h)))
        .map(|(l, h)| format!("\"{l}-{h}\": [{:.4}]", (r.next() + 1.0) / 2.0))
        .collect();
    HeadScores::parse_json(&format!("{{{}}}", entries.join(", ")))
}

fn main() -> headwise::Result<()> {
    let gates = gates()?;
    let headkv = headkv_scores()?;
    match GpuStore::new(0) {
        Ok(gpu) => {
            println!("device: GPU (CUDA device 0)");
            let size = Size { batch: 4, prompt: 32768, steps: 16, layers: &[0, 8, 16, 24, 31], budget: 2048 };
            run(&gpu, size, &gates, &headkv, &|s: &GpuStore| s.synchronize().unwrap())
        }
        Err(why) => {
            println!("device: CPU SIMT emulator, reduced size ({why})");
            let size = Size { batch: 1, prompt: 1024, steps: 4, layers: &[0, 16, 31], budget: 160 };
            run(&EmuStore, size, &gates, &headkv, &|_| {})
        }
    }
}
