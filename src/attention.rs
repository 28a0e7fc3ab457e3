//! Decode attention over a layer's ragged segments (SPEC section 5): `cuda/attention.cu`.
//!
//! For sequence `b` and KV head `h` (segment `s = b * kv_heads + h`), the `G` query heads
//! `h * G .. h * G + G` of that sequence attend over the segment's tokens (Full: its `len` rows;
//! Streaming: sinks + ring). Logits are `scale * q . k` (default `1 / sqrt(head_dim)`), softmax
//! in f32, output in the KV dtype, optional log-sum-exp (natural log). An empty segment gives a
//! zero output and LSE `-inf`.
//!
//! Shapes: `q` and `out` are `[batch][heads][head_dim]` = `[num_segments * G][head_dim]`;
//! `lse` is `[num_segments * G]` f32.
//!
//! Non-finite inputs are not filtered: a NaN in a query, or in a K or V row of a segment, makes
//! the output (and the LSE, for a NaN logit) of exactly the query heads that read it NaN; every
//! other head is unaffected. Infinite logits are not special-cased either (`inf - inf` is NaN).
//!
//! Long segments are split into chunks over several blocks and merged (flash-decoding). The
//! split comes from [`plan`], FlashInfer's rule: no split when the segments alone fill the GPU,
//! else the smallest chunk (at least [`MIN_CHUNK`] tokens) whose block count fits the target.

use crate::cache::LayerCache;
use crate::dtype::KvElem;
use crate::error::{Error, Result};
use crate::kernels::{launch_1d, lookup};
use crate::layout::{DeviceTable, LayerLayout};
use crate::params::{HwAttentionParams, HwLaunch};
use crate::store::{KernelParams, Store, check_aligned};

// SAFETY: generated from cuda/params.h (repr(C) plain data); the attention and merge kernels
// take exactly this struct by value.
unsafe impl KernelParams for HwAttentionParams {}
// SAFETY: repr(C) plain data, passed by value as a kernel argument.
#[cfg(feature = "cuda")]
unsafe impl cudarc::driver::DeviceRepr for HwAttentionParams {}

/// Largest supported GQA group size.
pub const MAX_GROUP: usize = 16;
/// Smallest chunk the planner splits a segment into, in tokens.
pub const MIN_CHUNK: u32 = 128;
/// Largest number of chunks per segment (the grid's y dimension).
pub const MAX_SPLITS: u32 = 65535;
/// Blocks per SM the planner aims to fill (128-thread blocks, a few resident per SM).
const BLOCKS_PER_SM: usize = 4;
const THREADS: u32 = 128;
const HEADS_PER_MERGE_BLOCK: usize = 4;

/// How one attention launch is split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionPlan {
    /// Tokens per chunk; a segment of `len` tokens uses `ceil(len / chunk_tokens)` blocks.
    pub chunk_tokens: u32,
    /// The most chunks any segment uses (1: nothing is split, no merge).
    pub max_splits: u32,
}

/// Chooses the split for `layout` on a GPU with `sm_count` SMs.
pub fn plan(layout: &LayerLayout, sm_count: usize) -> AttentionPlan {
    let lens: Vec<u32> = layout.segments().iter().map(|s| s.len).collect();
    let max_len = lens.iter().copied().max().unwrap_or(0).max(1);
    let target = sm_count.max(1) * BLOCKS_PER_SM;
    if lens.len() >= target || max_len <= MIN_CHUNK {
        return AttentionPlan { chunk_tokens: max_len, max_splits: 1 };
    }
    let blocks = |chunk: u32| -> usize { lens.iter().map(|&l| l.div_ceil(chunk).max(1) as usize).sum() };
    // Smallest chunk in [MIN_CHUNK, max_len] whose block count fits the target (blocks() falls
    // as chunk grows; at max_len it is lens.len() < target).
    let (mut lo, mut hi) = (MIN_CHUNK, max_len);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if blocks(mid) <= target { hi = mid } else { lo = mid + 1 }
    }
    AttentionPlan { chunk_tokens: lo, max_splits: max_len.div_ceil(lo) }
}

/// Options of [`LayerCache::attention`].
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionOptions {
    /// Softmax scale; `None` is `1 / sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Forces a split (tokens per chunk) instead of [`plan`]'s choice.
    pub chunk_tokens: Option<u32>,
}

/// Scratch memory for split segments (partial outputs and LSEs), reused across calls and grown
/// on demand, so a decode loop allocates it once.
///
/// The scratch belongs to the store that allocated it: used with a cache of another store (on
/// the GPU, another device), the workspace frees it and allocates it again there rather than
/// hand one device's memory to another's kernels.
pub struct AttentionWorkspace<S: Store> {
    partial_out: Option<S::Buf<f32>>,
    partial_lse: Option<S::Buf<f32>>,
}

impl<S: Store> Default for AttentionWorkspace<S> {
    fn default() -> Self {
        AttentionWorkspace { partial_out: None, partial_lse: None }
    }
}

impl<S: Store> AttentionWorkspace<S> {
    /// An empty workspace (allocates on first split launch).
    pub fn new() -> Self {
        Self::default()
    }

    fn ensure(&mut self, store: &S, out_elems: usize, lse_elems: usize) -> Result<()> {
        let unusable =
            |b: &S::Buf<f32>, elems: usize| S::len(b) < elems || store.check_buf("workspace", b).is_err();
        if self.partial_out.as_ref().is_none_or(|b| unusable(b, out_elems)) {
            self.partial_out = Some(store.zeros(out_elems)?);
        }
        if self.partial_lse.as_ref().is_none_or(|b| unusable(b, lse_elems)) {
            self.partial_lse = Some(store.zeros(lse_elems)?);
        }
        Ok(())
    }
}

/// The kernel bucket for group size `g` (kernels are instantiated for 1, 2, 4, 8, 16 and loop
/// to the runtime size).
fn group_bucket(g: usize) -> usize {
    g.next_power_of_two()
}

impl<S: Store, T: KvElem> LayerCache<S, T> {
    /// Decode attention for one layer; see the module docs for shapes and semantics.
    ///
    /// The planner sizes splits for the store's SM count ([`Store::sm_count`]). Errors before
    /// any launch: `group_size` outside 1..=16, wrong `q`/`out`/`lse` lengths, misaligned
    /// buffers, a non-finite or zero scale, a chunk size that is 0 or needs more than
    /// [`MAX_SPLITS`] chunks.
    pub fn attention(
        &self,
        q: &S::Buf<T>,
        group_size: usize,
        out: &mut S::Buf<T>,
        lse: Option<&mut S::Buf<f32>>,
        workspace: &mut AttentionWorkspace<S>,
        opts: &AttentionOptions,
    ) -> Result<()> {
        let d = self.head_dim();
        if group_size == 0 || group_size > MAX_GROUP {
            return Err(Error::invalid("group_size", format!("{group_size} is outside 1..={MAX_GROUP}")));
        }
        let n = self.layout().segments().len();
        let heads = n * group_size;
        for (field, len) in [("q", S::len(q)), ("out", S::len(out))] {
            if len != heads * d {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{len} elements, expected num_segments {n} * group_size {group_size} * head_dim {d}"
                    ),
                ));
            }
        }
        if let Some(l) = lse.as_deref()
            && S::len(l) != heads
        {
            return Err(Error::invalid("lse", format!("{} elements, expected {heads}", S::len(l))));
        }
        let scale = opts.scale.unwrap_or(1.0 / (d as f32).sqrt());
        // The kernels work in base 2: scale * log2(e) must stay finite too.
        if !(scale * std::f32::consts::LOG2_E).is_finite() || scale == 0.0 {
            return Err(Error::invalid(
                "scale",
                format!(
                    "{scale} must be nonzero with |scale| * log2(e) finite (|scale| < {:e})",
                    f32::MAX / std::f32::consts::LOG2_E
                ),
            ));
        }
        let plan = match opts.chunk_tokens {
            Some(c) if c == 0 || c > i32::MAX as u32 => {
                return Err(Error::invalid("chunk_tokens", format!("{c} is outside 1..={}", i32::MAX)));
            }
            Some(c) => {
                let max_len = self.layout().segments().iter().map(|s| s.len).max().unwrap_or(0).max(1);
                AttentionPlan { chunk_tokens: c, max_splits: max_len.div_ceil(c) }
            }
            None => plan(self.layout(), self.store().sm_count()),
        };
        if plan.max_splits > MAX_SPLITS {
            return Err(Error::invalid(
                "chunk_tokens",
                format!("{} gives {} chunks, at most {MAX_SPLITS}", plan.chunk_tokens, plan.max_splits),
            ));
        }
        let splits = plan.max_splits as usize;
        if splits > 1 {
            workspace.ensure(self.store(), heads * splits * d, heads * splits)?;
        }

        let name =
            |kind: &str, bucket: String| format!("hw_attention{kind}_{}_d{d}{bucket}", T::DTYPE.name());
        let kernel = lookup(&name("", format!("_g{}", group_bucket(group_size))), "head_dim")?;
        let merge = lookup(&name("_merge", String::new()), "head_dim")?;
        let store = self.store();
        let mut pins = S::Pins::default();
        let null = std::ptr::null_mut::<f32>();
        let params = HwAttentionParams {
            q: store.addr("q", q, &mut pins)? as *const _,
            k_cache: store.addr("k", self.k(), &mut pins)? as *const _,
            v_cache: store.addr("v", self.v(), &mut pins)? as *const _,
            seg: DeviceTable::params(store.addr("device_table", self.device_table(), &mut pins)?, n),
            out: store.addr_mut("out", out, &mut pins)? as *mut _,
            lse: match lse {
                Some(l) => store.addr_mut("lse", l, &mut pins)? as *mut f32,
                None => null,
            },
            partial_out: match (&mut workspace.partial_out, splits > 1) {
                (Some(b), true) => store.addr_mut("workspace", b, &mut pins)? as *mut f32,
                _ => null,
            },
            partial_lse: match (&mut workspace.partial_lse, splits > 1) {
                (Some(b), true) => store.addr_mut("workspace", b, &mut pins)? as *mut f32,
                _ => null,
            },
            group_size: group_size as i32,
            head_dim: d as i32,
            chunk_tokens: plan.chunk_tokens as i32,
            max_splits: plan.max_splits as i32,
            scale_log2: scale * std::f32::consts::LOG2_E,
        };
        check_aligned("q", params.q as u64)?;
        check_aligned("out", params.out as u64)?;
        let cfg = HwLaunch { grid_y: plan.max_splits, ..launch_1d(n, THREADS, 0) };
        // SAFETY: all addresses come from this store and stay pinned; the layout is validated
        // (every row a segment can name lies inside k/v), q/out/lse hold num_segments * G rows,
        // and a split launch has a workspace of num_segments * G * max_splits rows.
        unsafe { store.launch(kernel, &cfg, &params)? };
        if splits > 1 {
            let cfg = launch_1d(heads.div_ceil(HEADS_PER_MERGE_BLOCK), THREADS, 0);
            // SAFETY: as above; the merge reads only the workspace rows the first kernel wrote.
            unsafe { store.launch(merge, &cfg, &params)? };
        }
        drop(pins);
        Ok(())
    }
}
