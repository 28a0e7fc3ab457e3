//! DuoAttention / RLKV head policies (SPEC sections 5 and 6): a gate per (layer, KV head) says
//! how much the head needs the full context; the lowest `sparsity` fraction of all heads become
//! `Streaming { sink, window }` segments, the rest stay `Full`.
//!
//! Files: DuoAttention `full_attention_heads.tsv` and RLKV `adapter_weights.tsv`, tab-separated
//! floats, one row per layer, one column per KV head; values may be slightly negative and are
//! clipped to [0, 1] as the authors' loaders do. A DuoAttention `config.json` beside the file
//! carries the training `sink_size`/`recent_size` (and optional `deploy_*` overrides).

use crate::error::{Error, Result};
use crate::layout::{LayerLayout, LayoutBuilder};
use std::path::Path;

/// Per-(layer, KV head) gates in [0, 1], layer-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadGates {
    layers: usize,
    kv_heads: usize,
    gates: Vec<f64>,
}

/// Sink and window sizes of the streaming heads, in tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamingSize {
    /// Attention-sink tokens kept from the start.
    pub sink: u32,
    /// Most recent tokens kept.
    pub window: u32,
}

impl StreamingSize {
    /// RLKV's evaluation setting: 16 sink + 64 recent tokens.
    pub const RLKV: StreamingSize = StreamingSize { sink: 16, window: 64 };
    /// DuoAttention's deployment setting (its LongBench scripts): 64 sink + 256 recent.
    pub const DUO_ATTENTION_DEPLOY: StreamingSize = StreamingSize { sink: 64, window: 256 };
}

impl HeadGates {
    /// Parses a gate TSV. Errors name the line and column of anything that is not a finite
    /// float, a row whose column count differs from the first, or an empty file.
    pub fn parse_tsv(text: &str) -> Result<HeadGates> {
        let mut gates = Vec::new();
        let mut kv_heads = 0;
        let mut layers = 0;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let mut cols = 0;
            for (j, field) in line.split(['\t', ' ']).filter(|f| !f.is_empty()).enumerate() {
                let v: f64 = field.parse().map_err(|_| {
                    Error::invalid(
                        format!("gates line {} column {}", i + 1, j + 1),
                        format!("{field:?} is not a number"),
                    )
                })?;
                if !v.is_finite() {
                    return Err(Error::invalid(
                        format!("gates line {} column {}", i + 1, j + 1),
                        format!("{field:?} is not finite"),
                    ));
                }
                gates.push(v.clamp(0.0, 1.0));
                cols += 1;
            }
            if layers == 0 {
                kv_heads = cols;
            } else if cols != kv_heads {
                return Err(Error::invalid(
                    format!("gates line {}", i + 1),
                    format!("{cols} columns, the first row has {kv_heads}"),
                ));
            }
            layers += 1;
        }
        if layers == 0 {
            return Err(Error::invalid("gates", "the file holds no rows"));
        }
        Ok(HeadGates { layers, kv_heads, gates })
    }

    /// Reads and parses a gate TSV file.
    pub fn load(path: impl AsRef<Path>) -> Result<HeadGates> {
        HeadGates::parse_tsv(&super::read_text(path.as_ref(), "gates path")?)
    }

    /// Layers (rows).
    pub fn layers(&self) -> usize {
        self.layers
    }
    /// KV heads per layer (columns).
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }
    /// The clipped gate of (`layer`, `kv_head`) (f64, as `np.loadtxt` reads it).
    pub fn gate(&self, layer: usize, kv_head: usize) -> f64 {
        self.gates[layer * self.kv_heads + kv_head]
    }

    /// Chooses the full heads as the authors do: `threshold = np.quantile(gates, sparsity)`
    /// over all layers x KV heads (numpy's default linear method, reproduced in f64 operation
    /// for operation), full iff `gate >= threshold`. The authors add U(0, 1e-6) noise first to
    /// break ties; here ties break by index instead: among equal gates the head with the lower
    /// `layer * kv_heads + kv_head` counts as smaller, so it is compressed first. `sparsity` is
    /// the fraction of heads compressed, in [0, 1].
    pub fn select_full(&self, sparsity: f64) -> Result<FullHeads> {
        if !(0.0..=1.0).contains(&sparsity) {
            return Err(Error::invalid("sparsity", format!("{sparsity} is outside [0, 1]")));
        }
        let n = self.gates.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| self.gates[a].total_cmp(&self.gates[b]).then(a.cmp(&b)));
        let sorted: Vec<f64> = order.iter().map(|&i| self.gates[i]).collect();
        let (threshold, virtual_index) = numpy_linear_quantile(&sorted, sparsity);
        // Under the noise model a threshold that falls strictly between two positions of the
        // sorted order compresses everything up to the upper one; the float threshold decides
        // for every gate that differs from it.
        let below = sorted.iter().filter(|&&g| g < threshold).count();
        let at_or_below = sorted.iter().filter(|&&g| g <= threshold).count();
        let compressed = (virtual_index.ceil() as usize).clamp(below, at_or_below);
        let mut full = vec![true; n];
        for &i in &order[..compressed] {
            full[i] = false;
        }
        Ok(FullHeads { layers: self.layers, kv_heads: self.kv_heads, full })
    }
}

/// `np.quantile(sorted, q)` with the default linear method (numpy >= 1.22), and its virtual
/// index, with numpy's operation order so the float results agree.
fn numpy_linear_quantile(sorted: &[f64], q: f64) -> (f64, f64) {
    let n = sorted.len() as f64;
    // _compute_virtual_index(n, q, alpha, beta) = n*q + (alpha + q*(1 - alpha - beta)) - 1
    const ALPHA: f64 = 1.0;
    const BETA: f64 = 1.0;
    let virtual_index = (n * q + (ALPHA + q * (1.0 - ALPHA - BETA)) - 1.0).clamp(0.0, n - 1.0);
    let prev = virtual_index.floor();
    let next = (prev + 1.0).min(n - 1.0);
    let gamma = virtual_index - prev;
    let (a, b) = (sorted[prev as usize], sorted[next as usize]);
    // _lerp: a + (b - a) * t, or b - (b - a) * (1 - t) where t >= 0.5
    let diff = b - a;
    let value = if gamma >= 0.5 { b - diff * (1.0 - gamma) } else { a + diff * gamma };
    (value, virtual_index)
}

/// Which heads of a model keep their full cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FullHeads {
    layers: usize,
    kv_heads: usize,
    full: Vec<bool>,
}

/// Most heads (layers x KV heads) [`FullHeads::all_full`] builds; real models have a few
/// thousand. The bound keeps a mistaken count from allocating that many flags.
pub const MAX_HEADS: usize = 1 << 20;

impl FullHeads {
    /// Every head full (the uncompressed baseline); at most [`MAX_HEADS`] heads in all.
    pub fn all_full(layers: usize, kv_heads: usize) -> Result<FullHeads> {
        match layers.checked_mul(kv_heads) {
            Some(n) if n <= MAX_HEADS => Ok(FullHeads { layers, kv_heads, full: vec![true; n] }),
            _ => Err(Error::invalid(
                "layers * kv_heads",
                format!("{layers} * {kv_heads} exceeds {MAX_HEADS} heads"),
            )),
        }
    }

    /// Whether (`layer`, `kv_head`) keeps a full cache.
    pub fn is_full(&self, layer: usize, kv_head: usize) -> bool {
        self.full[layer * self.kv_heads + kv_head]
    }
    /// Layers.
    pub fn layers(&self) -> usize {
        self.layers
    }
    /// KV heads per layer.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }
    /// Number of full heads over all layers.
    pub fn count_full(&self) -> usize {
        self.full.iter().filter(|&&f| f).count()
    }
    /// The sparsity achieved, as the authors report it: `1 - mean(full)`.
    pub fn achieved_sparsity(&self) -> f64 {
        1.0 - self.count_full() as f64 / self.full.len() as f64
    }

    /// The layout of `layer` for `context_lens[b]` prompt tokens per sequence: full heads hold
    /// their context plus `headroom` rows for decoding, streaming heads `size.sink +
    /// size.window` rows (empty; the caller fills them).
    pub fn layer_layout(
        &self,
        layer: usize,
        context_lens: &[u32],
        headroom: u32,
        size: StreamingSize,
    ) -> Result<LayerLayout> {
        if layer >= self.layers {
            return Err(Error::invalid("layer", format!("{layer} >= {} layers", self.layers)));
        }
        if size.window == 0 {
            return Err(Error::invalid("size.window", "must be at least 1"));
        }
        let mut b = LayoutBuilder::new(context_lens.len(), self.kv_heads).headroom(headroom);
        for (s, &len) in context_lens.iter().enumerate() {
            for h in 0..self.kv_heads {
                b = if self.is_full(layer, h) {
                    b.full(s, h, len)
                } else {
                    b.streaming(s, h, size.sink, size.window)
                };
            }
        }
        b.build()
    }
}

/// The streaming size a DuoAttention `config.json` records: `deploy_sink_size` /
/// `deploy_recent_size` when set, else the training `sink_size` / `recent_size`.
pub fn duo_attention_config(text: &str) -> Result<StreamingSize> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::invalid("config.json", e.to_string()))?;
    // Errors name the key actually read: the deploy key when it is set, else the training one.
    let field = |deploy: &'static str, train: &'static str| -> Result<(u32, &'static str)> {
        let (key, x) = match v.get(deploy).filter(|x| !x.is_null()) {
            Some(x) => (deploy, x),
            None => (
                train,
                v.get(train).ok_or_else(|| Error::invalid(format!("config.json {train}"), "missing"))?,
            ),
        };
        let n = x.as_u64().filter(|&n| n <= u64::from(u32::MAX)).ok_or_else(|| {
            Error::invalid(format!("config.json {key}"), format!("{x} is not a token count"))
        })?;
        Ok((n as u32, key))
    };
    let (sink, _) = field("deploy_sink_size", "sink_size")?;
    let (window, window_key) = field("deploy_recent_size", "recent_size")?;
    if window == 0 {
        return Err(Error::invalid(format!("config.json {window_key}"), "must be at least 1"));
    }
    Ok(StreamingSize { sink, window })
}
