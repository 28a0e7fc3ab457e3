//! Policies: per-layer and per-head budgets (SnapKV, PyramidKV, HeadKV), DuoAttention/RLKV
//! head gates and HeadKV head-score files. Host computations only.

use super::args::{free_handle, handle, input, out_handle, out_value, output, utf8, write_optional};
use super::errors::boundary;
use crate::error::{Error, Result};
use crate::policy::budget::{self, HeadKvOptions, HeadKvVariant};
use crate::policy::head_scores::HeadScores;
use crate::policy::heads::{HeadGates, duo_attention_config};
use std::ffi::{c_char, c_int};

/// HeadKV allocation as in the HeadKV repository (`B = base - window`, `temp` applied).
pub const HEADWISE_HEADKV_REPO: c_int = 0;
/// HeadKV allocation as in the KVCache-Factory port (`B = base`, no `temp`).
pub const HEADWISE_HEADKV_KVCACHE_FACTORY: c_int = 1;
/// PyramidKV's default `beta`.
pub const HEADWISE_PYRAMID_BETA_DEFAULT: u32 = 20;
/// HeadKV's default `beta`.
pub const HEADWISE_HEADKV_BETA_DEFAULT: f32 = 1.5;
/// HeadKV's default `temp`.
pub const HEADWISE_HEADKV_TEMP_DEFAULT: f32 = 1.0;
/// RLKV's streaming heads: sink tokens.
pub const HEADWISE_RLKV_SINK: u32 = 16;
/// RLKV's streaming heads: recent-token window.
pub const HEADWISE_RLKV_WINDOW: u32 = 64;

/// SnapKV: every head keeps `capacity` tokens (window included). Writes `capacity` to `*out`
/// after checking `capacity > window`.
///
/// # Safety
/// `out` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_budget_uniform(capacity: u32, window: u32, out: *mut u32) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on `out`.
        let out = unsafe { out_value(out, "out") }?;
        *out = budget::uniform(capacity, window)?;
        Ok(())
    })
}

/// PyramidKV per-layer budgets (tokens, window included) for a prompt of `prompt_len` tokens,
/// with the authors' integer arithmetic (`beta`: `HEADWISE_PYRAMID_BETA_DEFAULT` = 20). Writes
/// `layers` budgets to `out`; `out_len` must equal `layers`. Example: capacity 128, window 8,
/// 32 layers and a long prompt give 242, 235, ..., 25 (4016 prefix tokens in all).
///
/// # Safety
/// `out` must be NULL or hold `out_len` writable elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_budget_pyramid(
    capacity: u32,
    window: u32,
    layers: usize,
    prompt_len: u32,
    beta: u32,
    out: *mut u32,
    out_len: usize,
) -> c_int {
    boundary(|| {
        if out_len != layers {
            return Err(Error::invalid("out_len", format!("{out_len}, expected layers = {layers}")));
        }
        // SAFETY: the caller's promise on `out`'s length.
        let out = unsafe { output(out, out_len, "out") }?;
        out.copy_from_slice(&budget::pyramid(capacity, window, layers, prompt_len, beta)?);
        Ok(())
    })
}

/// HeadKV / HeadKV-R2 per-head budgets (tokens, window included) from `importance[num_heads]`
/// (one score per head over all layers, `[layer][head]`, e.g. from
/// `headwise_head_scores_importance`). `beta` (default 1.5) and `temp` (default 1.0) as in
/// HeadKV; `variant` is `HEADWISE_HEADKV_REPO` or `HEADWISE_HEADKV_KVCACHE_FACTORY`. Writes
/// `num_heads` budgets; `out_len` must equal `num_heads`.
///
/// # Safety
/// `importance` must be NULL or hold `num_heads` readable floats; `out` NULL or `out_len`
/// writable elements.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn headwise_budget_headkv(
    importance: *const f32,
    num_heads: usize,
    base_capacity: u32,
    window: u32,
    beta: f32,
    temp: f32,
    variant: c_int,
    out: *mut u32,
    out_len: usize,
) -> c_int {
    boundary(|| {
        let variant = match variant {
            HEADWISE_HEADKV_REPO => HeadKvVariant::HeadKvRepo,
            HEADWISE_HEADKV_KVCACHE_FACTORY => HeadKvVariant::KvCacheFactory,
            v => return Err(Error::invalid("variant", format!("{v} is not a HEADWISE_HEADKV_* value"))),
        };
        if out_len != num_heads {
            return Err(Error::invalid("out_len", format!("{out_len}, expected num_heads = {num_heads}")));
        }
        // SAFETY: the caller's promise on both arrays' lengths.
        let importance = unsafe { input(importance, num_heads, "importance") }?;
        let out = unsafe { output(out, out_len, "out") }?;
        let opts = HeadKvOptions { beta, temp, variant };
        out.copy_from_slice(&budget::headkv(importance, base_capacity, window, &opts)?);
        Ok(())
    })
}

/// DuoAttention / RLKV head gates: one value per (layer, KV head), parsed from a gate TSV
/// (`full_attention_heads.tsv`, `adapter_weights.tsv`). Free with `headwise_head_gates_free`.
pub struct HeadwiseHeadGates {
    gates: HeadGates,
}

/// Parses a gate TSV: `text_len` bytes of UTF-8 at `text` (no NUL needed), one row per layer,
/// one tab- or space-separated float per KV head, clipped to [0, 1]. Errors name the line and
/// column of a bad value, a row of another width, or an empty file.
///
/// # Safety
/// `text` must be NULL or hold `text_len` readable bytes; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_gates_parse(
    text: *const c_char,
    text_len: usize,
    out: *mut *mut HeadwiseHeadGates,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let out = unsafe { out_handle(out) }?;
        let gates = HeadGates::parse_tsv(unsafe { utf8(text, text_len, "text") }?)?;
        *out = Box::into_raw(Box::new(HeadwiseHeadGates { gates }));
        Ok(())
    })
}

/// Layers (rows) and KV heads (columns) of a gate table; either out-pointer may be NULL.
///
/// # Safety
/// `gates` must be NULL or live; each out-pointer NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_gates_shape(
    gates: *const HeadwiseHeadGates,
    layers: *mut usize,
    kv_heads: *mut usize,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on every pointer.
        let g = unsafe { handle(gates, "gates") }?;
        unsafe { write_optional(layers, "layers", g.gates.layers()) }?;
        unsafe { write_optional(kv_heads, "kv_heads", g.gates.kv_heads()) }
    })
}

/// The clipped gates, `[layer][kv_head]`; `len` must be `layers * kv_heads`.
///
/// # Safety
/// `gates` must be NULL or live; `out` NULL or `len` writable doubles.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_gates_values(
    gates: *const HeadwiseHeadGates,
    out: *mut f64,
    len: usize,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let g = &unsafe { handle(gates, "gates") }?.gates;
        let out = unsafe { output(out, checked_grid_len(len, g.layers(), g.kv_heads())?, "out") }?;
        for (i, v) in out.iter_mut().enumerate() {
            *v = g.gate(i / g.kv_heads(), i % g.kv_heads());
        }
        Ok(())
    })
}

fn checked_grid_len(len: usize, layers: usize, heads: usize) -> Result<usize> {
    if Some(len) != layers.checked_mul(heads) {
        return Err(Error::invalid("len", format!("{len}, expected layers {layers} * heads {heads}")));
    }
    Ok(len)
}

/// Chooses the full heads as DuoAttention/RLKV do: the `sparsity` fraction (in [0, 1]) of heads
/// with the lowest gates become streaming (numpy's quantile rule, ties broken by index). Writes
/// `mask[layer * kv_heads + kv_head]` = 1 for a full head, 0 for a streaming one; `mask_len`
/// must be `layers * kv_heads`. Build each layer's layout with `headwise_layout_pack` (mode
/// Full where the mask is 1, Streaming with e.g. `HEADWISE_RLKV_SINK`/`_WINDOW` elsewhere).
///
/// # Safety
/// `gates` must be NULL or live; `mask` NULL or `mask_len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_gates_select_full(
    gates: *const HeadwiseHeadGates,
    sparsity: f64,
    mask: *mut u8,
    mask_len: usize,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let g = &unsafe { handle(gates, "gates") }?.gates;
        let len = checked_grid_len(mask_len, g.layers(), g.kv_heads()).map_err(|_| {
            Error::invalid("mask_len", format!("{mask_len}, expected {} * {}", g.layers(), g.kv_heads()))
        })?;
        let mask = unsafe { output(mask, len, "mask") }?;
        let full = g.select_full(sparsity)?;
        for (i, m) in mask.iter_mut().enumerate() {
            *m = u8::from(full.is_full(i / g.kv_heads(), i % g.kv_heads()));
        }
        Ok(())
    })
}

/// Frees a gate table. NULL is ignored.
///
/// # Safety
/// `gates` must be NULL or live, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_gates_free(gates: *mut HeadwiseHeadGates) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise.
        unsafe { free_handle(gates) };
        Ok(())
    })
}

/// Reads a DuoAttention `config.json` (`text_len` bytes of UTF-8): the streaming heads' sink and
/// window in tokens (`deploy_sink_size`/`deploy_recent_size` when set, else `sink_size`/
/// `recent_size`).
///
/// # Safety
/// `text` must be NULL or hold `text_len` readable bytes; `sink` and `window` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_duo_attention_config(
    text: *const c_char,
    text_len: usize,
    sink: *mut u32,
    window: *mut u32,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on every pointer.
        let sink = unsafe { out_value(sink, "sink") }?;
        let window = unsafe { out_value(window, "window") }?;
        let size = duo_attention_config(unsafe { utf8(text, text_len, "text") }?)?;
        (*sink, *window) = (size.sink, size.window);
        Ok(())
    })
}

/// HeadKV head scores: one importance per (layer, head), parsed from a HeadKV score file.
/// Free with `headwise_head_scores_free`.
pub struct HeadwiseHeadScores {
    scores: HeadScores,
}

/// Parses a HeadKV score file (`text_len` bytes of UTF-8 JSON): an object with keys
/// `"layer-head"`, each a non-empty list of per-sample scores; a head's importance is the mean.
/// The keys must cover a full layers x heads grid. The authors' files name query heads.
///
/// # Safety
/// `text` must be NULL or hold `text_len` readable bytes; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_scores_parse(
    text: *const c_char,
    text_len: usize,
    out: *mut *mut HeadwiseHeadScores,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let out = unsafe { out_handle(out) }?;
        let scores = HeadScores::parse_json(unsafe { utf8(text, text_len, "text") }?)?;
        *out = Box::into_raw(Box::new(HeadwiseHeadScores { scores }));
        Ok(())
    })
}

/// Layers and heads per layer of a score table; either out-pointer may be NULL.
///
/// # Safety
/// `scores` must be NULL or live; each out-pointer NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_scores_shape(
    scores: *const HeadwiseHeadScores,
    layers: *mut usize,
    heads: *mut usize,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on every pointer.
        let s = &unsafe { handle(scores, "scores") }?.scores;
        unsafe { write_optional(layers, "layers", s.layers()) }?;
        unsafe { write_optional(heads, "heads", s.heads()) }
    })
}

/// The importances, `[layer][head]`; `len` must be `layers * heads`. This is the input of
/// `headwise_budget_headkv`.
///
/// # Safety
/// `scores` must be NULL or live; `out` NULL or `len` writable floats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_scores_importance(
    scores: *const HeadwiseHeadScores,
    out: *mut f32,
    len: usize,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let s = &unsafe { handle(scores, "scores") }?.scores;
        let out = unsafe { output(out, checked_grid_len(len, s.layers(), s.heads())?, "out") }?;
        out.copy_from_slice(s.as_slice());
        Ok(())
    })
}

/// A new score table with `kv_heads` heads per layer: each KV head's importance is the mean over
/// its group of `heads / kv_heads` consecutive query heads (`kv_heads` must divide `heads`).
///
/// # Safety
/// `scores` must be NULL or live; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_scores_to_kv_heads(
    scores: *const HeadwiseHeadScores,
    kv_heads: usize,
    out: *mut *mut HeadwiseHeadScores,
) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise on both pointers.
        let out = unsafe { out_handle(out) }?;
        let s = &unsafe { handle(scores, "scores") }?.scores;
        *out = Box::into_raw(Box::new(HeadwiseHeadScores { scores: s.to_kv_heads(kv_heads)? }));
        Ok(())
    })
}

/// Frees a score table. NULL is ignored.
///
/// # Safety
/// `scores` must be NULL or live, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn headwise_head_scores_free(scores: *mut HeadwiseHeadScores) -> c_int {
    boundary(|| {
        // SAFETY: the caller's promise.
        unsafe { free_handle(scores) };
        Ok(())
    })
}
