//! HeadKV head-score files (SPEC section 6): one JSON object, keys `"layer-head"`, each a list of
//! per-sample scores; a head's importance is the mean of its list. The keys name **query** heads
//! (32 x 32 for Llama-3-8B and Mistral-7B even though they have 8 KV heads); [`HeadScores::to_kv_heads`]
//! maps them to KV heads by group mean.

use crate::error::{Error, Result};
use std::path::Path;

/// Per-head importance, `[layer][head]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadScores {
    layers: usize,
    heads: usize,
    importance: Vec<f32>,
}

impl HeadScores {
    /// Parses a HeadKV score file. The keys must cover a full `layers x heads` grid, each once;
    /// every list must be non-empty and finite. The key order does not matter (the authors'
    /// code relies on it being layer-major; this parser places each key by its name).
    pub fn parse_json(text: &str) -> Result<HeadScores> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::invalid("head scores", format!("not JSON: {e}")))?;
        let obj =
            v.as_object().ok_or_else(|| Error::invalid("head scores", "the file is not a JSON object"))?;
        if obj.is_empty() {
            return Err(Error::invalid("head scores", "the object has no keys"));
        }
        let mut entries = Vec::with_capacity(obj.len());
        for (key, list) in obj {
            let field = || format!("head scores key {key:?}");
            let (l, h) = key
                .split_once('-')
                .and_then(|(l, h)| Some((l.parse::<usize>().ok()?, h.parse::<usize>().ok()?)))
                .ok_or_else(|| Error::invalid(field(), "keys must be \"layer-head\""))?;
            // A full grid of n keys has at most n layers and n heads; checking here keeps the
            // grid arithmetic below from overflowing on a key like "18446744073709551615-0".
            if l >= obj.len() || h >= obj.len() {
                return Err(Error::invalid(
                    field(),
                    format!("index {l}-{h} cannot be part of a full grid of {} keys", obj.len()),
                ));
            }
            let list = list.as_array().ok_or_else(|| Error::invalid(field(), "value is not a list"))?;
            if list.is_empty() {
                return Err(Error::invalid(field(), "empty list"));
            }
            let mut sum = 0.0f64;
            for x in list {
                let x = x.as_f64().ok_or_else(|| Error::invalid(field(), format!("{x} is not a number")))?;
                sum += x;
            }
            // Importances are stored as f32: a mean finite in f64 may still overflow there.
            let mean = (sum / list.len() as f64) as f32;
            if !mean.is_finite() {
                return Err(Error::invalid(field(), "the mean is not a finite f32"));
            }
            entries.push((l, h, mean));
        }
        let layers = entries.iter().map(|e| e.0).max().unwrap() + 1;
        let heads = entries.iter().map(|e| e.1).max().unwrap() + 1;
        if layers.checked_mul(heads) != Some(entries.len()) {
            return Err(Error::invalid(
                "head scores",
                format!("{} keys do not form a full grid of {layers} layers x {heads} heads", entries.len()),
            ));
        }
        let mut importance = vec![f32::NAN; layers * heads];
        for (l, h, m) in entries {
            let slot = &mut importance[l * heads + h];
            if !slot.is_nan() {
                return Err(Error::invalid("head scores", format!("key {l}-{h} appears twice")));
            }
            *slot = m;
        }
        Ok(HeadScores { layers, heads, importance })
    }

    /// Reads and parses a HeadKV score file.
    pub fn load(path: impl AsRef<Path>) -> Result<HeadScores> {
        HeadScores::parse_json(&super::read_text(path.as_ref(), "head scores path")?)
    }

    /// Layers.
    pub fn layers(&self) -> usize {
        self.layers
    }
    /// Heads per layer (query heads in the authors' files).
    pub fn heads(&self) -> usize {
        self.heads
    }
    /// Importance of (`layer`, `head`): the mean of its list.
    pub fn importance(&self, layer: usize, head: usize) -> f32 {
        self.importance[layer * self.heads + head]
    }
    /// All importances, `[layer][head]`.
    pub fn as_slice(&self) -> &[f32] {
        &self.importance
    }

    /// Maps query-head scores to `kv_heads` KV heads per layer by the mean over each group of
    /// `heads / kv_heads` consecutive query heads (KvHead granularity).
    pub fn to_kv_heads(&self, kv_heads: usize) -> Result<HeadScores> {
        if kv_heads == 0 || !self.heads.is_multiple_of(kv_heads) {
            return Err(Error::invalid(
                "kv_heads",
                format!("{kv_heads} does not divide {} heads", self.heads),
            ));
        }
        let g = self.heads / kv_heads;
        let importance = (0..self.layers)
            .flat_map(|l| (0..kv_heads).map(move |h| (l, h)))
            .map(|(l, h)| (0..g).map(|i| self.importance(l, h * g + i)).sum::<f32>() / g as f32)
            .collect();
        Ok(HeadScores { layers: self.layers, heads: kv_heads, importance })
    }
}
