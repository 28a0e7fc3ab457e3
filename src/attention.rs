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
use crate::layout::{DeviceTable, LayerLayout, SegmentMode};
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
/// Most queries per sequence of one [`LayerCache::attention_chunk`]; a longer chunk of prefill
/// goes in pieces of this size (append a piece, attend, append the next).
pub const MAX_CHUNK_QUERIES: usize = 64;
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

/// Chooses the split for `layout` on a GPU with `sm_count` SMs (decode: one query per
/// sequence).
pub fn plan(layout: &LayerLayout, sm_count: usize) -> AttentionPlan {
    plan_tiles(layout, sm_count, 1)
}

/// [`plan`] for a launch whose every split has `tiles` blocks (query tiles of a chunk).
fn plan_tiles(layout: &LayerLayout, sm_count: usize, tiles: usize) -> AttentionPlan {
    let lens: Vec<u32> = layout.segments().iter().map(|s| s.len).collect();
    let max_len = lens.iter().copied().max().unwrap_or(0).max(1);
    let target = sm_count.max(1) * BLOCKS_PER_SM;
    if lens.len() * tiles >= target || max_len <= MIN_CHUNK {
        return AttentionPlan { chunk_tokens: max_len, max_splits: 1 };
    }
    let blocks = |chunk: u32| -> usize {
        tiles * lens.iter().map(|&l| l.div_ceil(chunk).max(1) as usize).sum::<usize>()
    };
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
        self.attend(q, 1, group_size, out, lse, workspace, opts, None)
    }

    /// Attention of a chunk of `q_len` new queries per sequence over the cache: chunked prefill
    /// continuing a compressed prompt, a follow-up turn over a compressed history, or the
    /// verification of `q_len` speculative draft tokens. The chunk's K/V must already be in the
    /// cache as the newest `q_len` tokens of every segment ([`LayerCache::append_tokens`]);
    /// rejected drafts are dropped afterwards with [`LayerCache::rollback`]. Causal: chunk query
    /// `i` (the sequence's token `len - q_len + i` of each segment) attends over the segment's
    /// logical tokens `0 ..= len - q_len + i`, i.e. every kept token and the chunk up to itself.
    /// `q_len = 1` is [`LayerCache::attention`].
    ///
    /// Shapes, token-major as engines hold them: `q` and `out` are
    /// `[batch][q_len][heads][head_dim]` (`heads = kv_heads * group_size`), `lse` is
    /// `[batch][q_len][heads]` f32. Everything else (GQA grouping, scale, split, non-finite
    /// inputs) is as in [`LayerCache::attention`]. Each K/V row is read once per tile of 8 or 16
    /// query rows, a tile holding the whole group's heads for its chunk positions (see
    /// `cuda/attention.cu`).
    ///
    /// A `Streaming` segment holds the newest `window` tokens after the chunk was appended, so
    /// when its ring is full, chunk query `i` sees `q_len - 1 - i` fewer windowed tokens than a
    /// decode step at its position would have (the ones the later chunk tokens overwrote).
    ///
    /// Errors before any launch: those of [`LayerCache::attention`] (lengths now with the
    /// `q_len` factor), `q_len` outside `1..=`[`MAX_CHUNK_QUERIES`], and for `q_len > 1` a
    /// segment holding fewer than `q_len` tokens or a `Streaming` segment whose window is below
    /// `q_len`.
    ///
    /// ```
    /// use headwise::{AttentionOptions, AttentionWorkspace, EmuStore, LayerCache, LayoutBuilder, Store};
    /// use half::f16;
    /// // One sequence, one KV head with room for 8 tokens, one query head, head_dim 64.
    /// let layout = LayoutBuilder::new(1, 1).full(0, 0, 5).headroom(3).build()?;
    /// let mut cache = LayerCache::<_, f16>::new(&EmuStore, layout, 64)?;
    /// // Three draft tokens: append their K/V, attend with their three queries, keep two.
    /// let kv = EmuStore.upload(&vec![f16::ONE; 3 * 64])?;
    /// cache.append_tokens(&kv, &kv, 3)?;
    /// let q = EmuStore.upload(&vec![f16::ONE; 3 * 64])?;
    /// let mut out = EmuStore.zeros::<f16>(3 * 64)?;
    /// let mut ws = AttentionWorkspace::new();
    /// cache.attention_chunk(&q, 3, 1, &mut out, None, &mut ws, &AttentionOptions::default())?;
    /// cache.rollback(&[1])?;
    /// assert_eq!(cache.layout().segments()[0].len, 7);
    /// # Ok::<(), headwise::Error>(())
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn attention_chunk(
        &self,
        q: &S::Buf<T>,
        q_len: usize,
        group_size: usize,
        out: &mut S::Buf<T>,
        lse: Option<&mut S::Buf<f32>>,
        workspace: &mut AttentionWorkspace<S>,
        opts: &AttentionOptions,
    ) -> Result<()> {
        if q_len == 0 || q_len > MAX_CHUNK_QUERIES {
            return Err(Error::invalid("q_len", format!("{q_len} is outside 1..={MAX_CHUNK_QUERIES}")));
        }
        // q_len = 1 is decode, where an empty segment is fine (zero output, LSE -inf).
        for (i, seg) in self.layout().segments().iter().enumerate().filter(|_| q_len > 1) {
            if (seg.len as usize) < q_len {
                return Err(Error::invalid(
                    "q_len",
                    format!(
                        "{q_len} is more than segment {i} holds (len {}): append the chunk first",
                        seg.len
                    ),
                ));
            }
            if let SegmentMode::Streaming { window, .. } = seg.mode
                && (window as usize) < q_len
            {
                return Err(Error::invalid(
                    "q_len",
                    format!(
                        "{q_len} is above Streaming segment {i}'s window {window}: the chunk would overwrite itself"
                    ),
                ));
            }
        }
        self.attend(q, q_len, group_size, out, lse, workspace, opts, None)
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
        self.attend(q, 1, group_size, out, lse, workspace, opts, Some(mass))
    }

    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &S::Buf<T>,
        q_len: usize,
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
        // Query rows: q_len <= MAX_CHUNK_QUERIES and group_size <= MAX_GROUP, but n is the
        // caller's: checked.
        let heads = n
            .checked_mul(group_size * q_len)
            .ok_or_else(|| Error::invalid("q_len", "num_segments * group_size * q_len overflows usize"))?;
        for (field, len) in [("q", S::len(q)), ("out", S::len(out))] {
            if Some(len) != heads.checked_mul(d) {
                let shape = if q_len == 1 { String::new() } else { format!(" * q_len {q_len}") };
                return Err(Error::invalid(
                    field,
                    format!(
                        "{len} elements, expected num_segments {n} * group_size {group_size}{shape} * head_dim {d}"
                    ),
                ));
            }
        }
        if let Some(l) = lse.as_deref()
            && S::len(l) != heads
        {
            return Err(Error::invalid("lse", format!("{} elements, expected {heads}", S::len(l))));
        }
        // A chunk runs on the tiled kernels (buckets 8 and 16), GMAX query rows per block.
        let bucket = match q_len {
            1 => group_bucket(group_size),
            _ if group_size * q_len <= 8 => 8,
            _ => MAX_GROUP,
        };
        let tiles = if q_len == 1 { 1 } else { (group_size * q_len).div_ceil(bucket) };
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
            None => plan_tiles(self.layout(), self.store().sm_count(), tiles),
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
        let kind = if q_len == 1 { "" } else { "_chunk" };
        let kernel = lookup(&name(kind, format!("_g{bucket}")), "head_dim")?;
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
            q_len: q_len as i32,
            kv_heads: self.layout().kv_heads() as i32,
            scale_log2: scale * std::f32::consts::LOG2_E,
        };
        check_aligned("q", params.q as u64)?;
        check_aligned("out", params.out as u64)?;
        let cfg = HwLaunch { grid_y: plan.max_splits, grid_z: tiles as u32, ..launch_1d(n, THREADS, 0) };
        // SAFETY: all addresses come from this store and stay pinned; the layout is validated
        // (every row a segment can name lies inside k/v), q/out/lse hold num_segments * G *
        // q_len rows (every query_row the kernels form is below that), every segment holds at
        // least q_len tokens (attention_chunk), and a split launch has a workspace of
        // num_segments * G * q_len * max_splits rows.
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
