//! Per-layer and per-head token budgets for prefill compression (SPEC section 3), computed the
//! way the authors' code computes them, floors and rounding included.
//!
//! A budget here is the **total** number of tokens a segment keeps: the `window` most recent
//! prompt tokens plus the top `budget - window` prefix tokens. A budget of at least the prompt
//! length keeps everything.

use crate::error::{Error, Result};

/// Most layers [`pyramid`] plans for (models have a few hundred at most); the bound keeps a
/// mistaken count from allocating a budget list of that size.
pub const MAX_LAYERS: usize = 1 << 16;

/// SnapKV: every layer and head keeps `capacity` tokens (window included).
pub fn uniform(capacity: u32, window: u32) -> Result<u32> {
    if capacity <= window {
        return Err(Error::invalid("capacity", format!("{capacity} must exceed window {window}")));
    }
    Ok(capacity)
}

/// PyramidKV (`PyramidKVCluster.update_kv`, beta = 20 by default): per-layer budgets for a
/// prompt of `prompt_len` tokens in a model of `layers` layers, with the authors' integer
/// arithmetic and branches:
///
/// ```text
/// B = C - W; min = B / beta; max = 2B - min
/// if max >= q - W { max = q - W; min = 2B - max }
/// steps = (max - min) / (L - 1); budget_l = max - l * steps (+ W)
/// ```
/// Below `q < C` nothing is compressed (every budget is `q`); below `q < 2B` every layer gets the
/// uniform SnapKV budget `C`. The integer floors make the total overshoot `L * C` (the SPEC
/// example C = 128, W = 8, L = 32 keeps 4016 prefix tokens instead of 3840); that is kept.
/// `layers` is at most [`MAX_LAYERS`].
pub fn pyramid(capacity: u32, window: u32, layers: usize, prompt_len: u32, beta: u32) -> Result<Vec<u32>> {
    if capacity <= window {
        return Err(Error::invalid("capacity", format!("{capacity} must exceed window {window}")));
    }
    if !(2..=MAX_LAYERS).contains(&layers) {
        return Err(Error::invalid("layers", format!("{layers} is outside 2..={MAX_LAYERS}")));
    }
    if beta == 0 {
        return Err(Error::invalid("beta", "must be at least 1"));
    }
    if prompt_len < window {
        return Err(Error::invalid("prompt_len", format!("{prompt_len} is shorter than window {window}")));
    }
    let (c, w, q) = (i64::from(capacity), i64::from(window), i64::from(prompt_len));
    if q < c {
        return Ok(vec![prompt_len; layers]);
    }
    let b = c - w;
    if q < 2 * b {
        return Ok(vec![capacity; layers]);
    }
    let mut min = b / i64::from(beta);
    let mut max = 2 * b - min;
    if max >= q - w {
        max = q - w;
        min = 2 * b - max;
    }
    let steps = (max - min) / (layers as i64 - 1);
    Ok((0..layers as i64).map(|l| (max - l * steps + w) as u32).collect())
}

/// Which HeadKV code the allocation follows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeadKvVariant {
    /// FYYFU/HeadKV: `B = base - W`, scores raised to `temp`.
    #[default]
    HeadKvRepo,
    /// The KVCache-Factory port: `B = base` (no `- W`), no `temp`.
    KvCacheFactory,
}

/// HeadKV options (defaults: beta 1.5, temp 1.0, the HeadKV repository's formula).
#[derive(Clone, Copy, Debug)]
pub struct HeadKvOptions {
    /// Share of the budget kept as a per-head floor is `1 - 1/beta`; the rest is pooled.
    pub beta: f32,
    /// Sharpening exponent of the normalized scores (ignored by the KVCache-Factory variant).
    pub temp: f32,
    /// Which code to reproduce.
    pub variant: HeadKvVariant,
}

impl Default for HeadKvOptions {
    fn default() -> Self {
        HeadKvOptions { beta: 1.5, temp: 1.0, variant: HeadKvVariant::HeadKvRepo }
    }
}

/// HeadKV / HeadKV-R2 per-head budgets (window included) for every head of every layer,
/// `importance[l * heads + h]` (e.g. from a head-score file, mapped to KV heads):
///
/// ```text
/// s = importance / sum; s = s^temp; s /= sum; B = base - W
/// pool = floor(B / beta) * L * H; min = B - floor(B / beta)
/// cap = round(s * pool + min)            (f32, round half to even, like torch.round)
/// ```
/// plus `W`. The authors sum in f32 (torch's order); here sums run left to right in f32, so a
/// head whose `s * pool + min` lies within an f32 rounding step of a .5 boundary may differ by
/// one token. Caps are not clipped to the prompt: a head whose cap exceeds its prefix keeps the
/// whole prefix (the authors do not redistribute).
pub fn headkv(importance: &[f32], base_capacity: u32, window: u32, opts: &HeadKvOptions) -> Result<Vec<u32>> {
    if importance.is_empty() {
        return Err(Error::invalid("importance", "no heads"));
    }
    if let Some(i) = importance.iter().position(|x| !x.is_finite() || *x < 0.0) {
        return Err(Error::invalid(
            format!("importance[{i}]"),
            format!("{} is not a finite score >= 0", importance[i]),
        ));
    }
    if !(opts.beta.is_finite() && opts.beta >= 1.0) {
        return Err(Error::invalid("beta", format!("{} must be finite and >= 1", opts.beta)));
    }
    if !(opts.temp.is_finite() && opts.temp > 0.0) {
        return Err(Error::invalid("temp", format!("{} must be finite and > 0", opts.temp)));
    }
    let b = match opts.variant {
        HeadKvVariant::HeadKvRepo => {
            if base_capacity <= window {
                return Err(Error::invalid(
                    "base_capacity",
                    format!("{base_capacity} must exceed window {window}"),
                ));
            }
            base_capacity - window
        }
        HeadKvVariant::KvCacheFactory => base_capacity,
    };
    let sum = |v: &[f32]| v.iter().fold(0.0f32, |a, &x| a + x);
    let total = sum(importance);
    if total == 0.0 {
        return Err(Error::invalid("importance", "all scores are zero"));
    }
    // An infinite sum would make every share 0 (or NaN) and the budgets meaningless.
    if !total.is_finite() {
        return Err(Error::invalid("importance", "the scores' sum overflows f32"));
    }
    let mut s: Vec<f32> = importance.iter().map(|&x| x / total).collect();
    if opts.variant == HeadKvVariant::HeadKvRepo {
        s.iter_mut().for_each(|x| *x = x.powf(opts.temp));
        let t = sum(&s);
        if !(t.is_finite() && t > 0.0) {
            return Err(Error::invalid(
                "temp",
                format!("{}: every share raised to it underflows to 0 (sum {t})", opts.temp),
            ));
        }
        s.iter_mut().for_each(|x| *x /= t);
    }
    // Python: B // beta with a float beta is floor(B / beta), as a float.
    let pooled = (b as f32 / opts.beta).floor();
    let pool = pooled * importance.len() as f32;
    let min = b as f32 - pooled;
    s.iter()
        .map(|&x| {
            let cap = (x * pool + min).round_ties_even();
            if !(0.0..=i32::MAX as f32).contains(&cap) {
                return Err(Error::invalid("base_capacity", format!("head budget {cap} is out of range")));
            }
            (cap as u32).checked_add(window).ok_or_else(|| {
                Error::invalid("window", format!("{window} + head budget {cap} overflows u32"))
            })
        })
        .collect()
}
