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
use crate::params::{HwAttentionParams, HwH2oParams, HwLaunch};
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
/// Tokens per block of the mass kernel (cuda/heavy_hitters.cu).
const MASS_TOKENS: usize = 256;

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

/// Scratch memory for split segments (partial outputs and LSEs) and, for
/// [`LayerCache::attention_with_mass`] without a caller LSE, the LSE the mass kernel reads;
/// reused across calls and grown on demand, so a decode loop allocates it once.
///
/// The scratch belongs to the store that allocated it: used with a cache of another store (on
/// the GPU, another device), the workspace frees it and allocates it again there rather than
/// hand one device's memory to another's kernels.
pub struct AttentionWorkspace<S: Store> {
    partial_out: Option<S::Buf<f32>>,
    partial_lse: Option<S::Buf<f32>>,
    /// The LSE the mass kernel reads when the caller asks for mass but not for the LSE.
    mass_lse: Option<S::Buf<f32>>,
}

impl<S: Store> Default for AttentionWorkspace<S> {
    fn default() -> Self {
        AttentionWorkspace { partial_out: None, partial_lse: None, mass_lse: None }
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

    fn ensure_mass_lse(&mut self, store: &S, heads: usize) -> Result<()> {
        if self
            .mass_lse
            .as_ref()
            .is_none_or(|b| S::len(b) < heads || store.check_buf("workspace", b).is_err())
        {
            self.mass_lse = Some(store.zeros(heads.max(1))?);
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
        self.attend(q, group_size, out, lse, workspace, opts, None)
    }

    /// [`LayerCache::attention`], and then H2O's accumulated attention mass: every cached
    /// token's entry of `mass` gets the softmax probability the token received in this step,
    /// summed over the `group_size` query heads of its KV head (H2O / kvpress accumulate over
    /// the group). Output and LSE are exactly those of [`LayerCache::attention`] (same kernels);
    /// one more small kernel (`cuda/heavy_hitters.cu`) then recomputes `q . k` per token and
    /// query head against the final LSE, which a split segment knows only after the merge. It
    /// reads K once more: about half the bytes of the attention itself.
    ///
    /// `mass` is f32, one entry per cache row (`layout().total_rows()`), indexed like the K/V
    /// rows: the entry of a segment's logical token is at the row that token lives in. Start it
    /// from zeros; entries of rows no token occupies are not touched. A `Streaming` segment's
    /// entries follow its ring slots: the token that overwrites the oldest slot inherits that
    /// slot's mass (Streaming segments are never evicted by mass). The eviction
    /// [`crate::heavy_hitters::evict_by_mass`] moves the entries with their rows and zeroes the
    /// freed ones; other compactions ([`crate::redundancy::evict`], [`LayerCache::regrow`]) do
    /// not know about `mass`, so reset it after them. Each entry is written by one thread in a
    /// fixed order: the same inputs give the same mass bit for bit. Non-finite inputs are not
    /// filtered: a head whose LSE is NaN makes the mass of every token of its segment NaN.
    ///
    /// Errors before any launch: those of [`LayerCache::attention`], and a `mass` buffer whose
    /// length is not `total_rows`.
    ///
    /// ```
    /// use headwise::{AttentionOptions, AttentionWorkspace, EmuStore, LayerCache, LayoutBuilder, Store};
    /// use half::bf16;
    /// // One sequence, one KV head of 3 tokens, group of 2 query heads, head_dim 64.
    /// let layout = LayoutBuilder::new(1, 1).full(0, 0, 3).build()?;
    /// let rows = layout.total_rows();
    /// let cache = LayerCache::<_, bf16>::new(&EmuStore, layout, 64)?;
    /// let q = EmuStore.upload(&vec![bf16::ONE; 2 * 64])?;
    /// let mut out = EmuStore.zeros::<bf16>(2 * 64)?;
    /// let mut mass = EmuStore.zeros::<f32>(rows)?;
    /// let mut ws = AttentionWorkspace::new();
    /// cache.attention_with_mass(&q, 2, &mut out, None, &mut ws, &AttentionOptions::default(), &mut mass)?;
    /// // All-zero keys: each head spreads probability 1/3 over the 3 tokens; 2 heads.
    /// let m = EmuStore.download(&mass)?;
    /// assert!(m[..3].iter().all(|&x| (x - 2.0 / 3.0).abs() < 1e-6));
    /// # Ok::<(), headwise::Error>(())
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn attention_with_mass(
        &self,
        q: &S::Buf<T>,
        group_size: usize,
        out: &mut S::Buf<T>,
        lse: Option<&mut S::Buf<f32>>,
        workspace: &mut AttentionWorkspace<S>,
        opts: &AttentionOptions,
        mass: &mut S::Buf<f32>,
    ) -> Result<()> {
        self.attend(q, group_size, out, lse, workspace, opts, Some(mass))
    }

    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &S::Buf<T>,
        group_size: usize,
        out: &mut S::Buf<T>,
        lse: Option<&mut S::Buf<f32>>,
        workspace: &mut AttentionWorkspace<S>,
        opts: &AttentionOptions,
        mass: Option<&mut S::Buf<f32>>,
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
        if let Some(m) = mass.as_deref() {
            let rows = self.layout().total_rows();
            if S::len(m) != rows {
                return Err(Error::invalid(
                    "mass",
                    format!("{} elements, expected one per cache row (total_rows {rows})", S::len(m)),
                ));
            }
            self.store().check_buf("mass", m)?;
        }
        let splits = plan.max_splits as usize;
        if splits > 1 {
            workspace.ensure(self.store(), heads * splits * d, heads * splits)?;
        }
        // The mass kernel needs the final LSE: the caller's, or the workspace's.
        let mut lse = lse;
        if mass.is_some() && lse.is_none() {
            workspace.ensure_mass_lse(self.store(), heads)?;
            lse = workspace.mass_lse.as_mut();
        }
        let mass_kernel = match mass {
            Some(_) => Some(lookup(&format!("hw_h2o_mass_{}_d{d}", T::DTYPE.name()), "head_dim")?),
            None => None,
        };

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
        if let (Some(kernel), Some(m)) = (mass_kernel, mass) {
            let max_len = self.layout().segments().iter().map(|s| s.len as usize).max().unwrap_or(0);
            // Blocks of MASS_TOKENS tokens, larger when a segment would need more than the
            // grid's y limit (65535) of them.
            let per_block = MASS_TOKENS.max(max_len.div_ceil(MAX_SPLITS as usize));
            let mp = HwH2oParams {
                q: params.q,
                k_cache: params.k_cache as *mut _,
                v_cache: std::ptr::null_mut(),
                seg: params.seg,
                lse: params.lse as *const f32,
                mass: store.addr_mut("mass", m, &mut pins)? as *mut f32,
                targets: std::ptr::null(),
                keys: std::ptr::null_mut(),
                kept: std::ptr::null_mut(),
                num_targets: 0,
                group_size: group_size as i32,
                head_dim: d as i32,
                tokens_per_block: per_block as i32,
                budget: 0,
                recent: 0,
                max_len: max_len as i32,
                scale_log2: params.scale_log2,
            };
            let cfg =
                HwLaunch { grid_y: max_len.div_ceil(per_block).max(1) as u32, ..launch_1d(n, THREADS, 0) };
            // SAFETY: as above; the kernel only reads K (never writes it, whatever the pointer's
            // type), reads lse ([num_segments * G], written by the launches before) and adds to
            // mass entries of segment rows, each < total_rows = the checked length of mass.
            unsafe { store.launch(kernel, &cfg, &mp)? };
        }
        drop(pins);
        Ok(())
    }
}
