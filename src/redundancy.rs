//! R-KV decode-time redundancy eviction (SPEC section 4): `cuda/redundancy.cu`.
//!
//! During decoding, a `Full` segment that has grown to `len >= budget + buffer` tokens (or any
//! segment the caller forces) is scored and compacted **in place** to `budget` tokens: the
//! `alpha` newest tokens (the window) always stay; of the `n = len - alpha` older candidates,
//! the `budget - alpha` with the best score `lambda * A - (1 - lambda) * R` stay, in position
//! order. `A` (importance) comes from the last `alpha` queries of the group's query heads,
//! kept in a [`QueryRing`] that the decode loop pushes every step; `R` (redundancy) from the
//! cosine similarities of all `len` keys. The exact definition, with the authors' quirks and
//! where this crate departs from their code, is the f64 reference:
//! [`crate::reference::rkv`]. The similarity matrix (`len x len`) runs on the tensor cores and
//! never reaches global memory.
//!
//! Scores are f32 (the reference is f64); selections are deterministic and ties go to the lower
//! position; NaN scores rank lowest.
//!
//! Non-finite inputs are not filtered. A NaN in one key makes its similarity row and column NaN,
//! so every column mean, the redundancy softmax and every score of that segment are NaN: the
//! segment keeps its oldest `budget - alpha` candidates plus the window, and no other segment is
//! affected. A NaN query makes the importance of the segments it belongs to NaN in the same way.
//! The similarity threshold test (`S > 0.5`) is false for NaN, as in the reference.

use crate::cache::LayerCache;
use crate::dtype::{KvElem, check_head_dim};
use crate::error::{Error, Result};
use crate::kernels::{launch_1d, lookup};
use crate::layout::{DeviceTable, LayerLayout, Segment, SegmentMode};
use crate::params::{HwLaunch, HwQueryPushParams, HwRkvParams};
use crate::store::{KernelParams, Store, check_aligned, ensure};

// SAFETY: generated from cuda/params.h (repr(C) plain data); the kernels in
// cuda/redundancy.cu take exactly these structs by value.
unsafe impl KernelParams for HwRkvParams {}
unsafe impl KernelParams for HwQueryPushParams {}
// SAFETY: repr(C) plain data, passed by value as kernel arguments.
#[cfg(feature = "cuda")]
unsafe impl cudarc::driver::DeviceRepr for HwRkvParams {}
#[cfg(feature = "cuda")]
unsafe impl cudarc::driver::DeviceRepr for HwQueryPushParams {}

/// Largest `alpha` (queries per head in the ring, and window tokens) the kernels support.
pub const MAX_ALPHA: usize = 16;
/// Largest GQA group size.
pub const MAX_GROUP: usize = 16;
const TILE_THREADS: u32 = 128;
const SELECT_THREADS: u32 = 256;
const SLAB_ROWS: usize = 32;

/// Options of one R-KV step. Counts are tokens (rows).
///
/// There is no `Default`: the budget has no natural value. [`RkvOptions::new`] takes it and
/// fills in the authors' defaults for everything else.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RkvOptions {
    /// Tokens a segment keeps after an eviction, window included. Must exceed `alpha`.
    pub budget: usize,
    /// Slack before the automatic trigger: a `Full` segment is compacted once
    /// `len >= budget + buffer` (default 128), so evictions are amortized over `buffer` steps.
    pub buffer: usize,
    /// `num_recent_queries`: how many recent queries per query head score importance, and how
    /// many of the newest tokens form the always-kept window (default 8, at least 1).
    pub alpha: usize,
    /// Max-pool width over positions for the importance, odd (default 7; 1 = no pooling).
    pub kernel: usize,
    /// Weight of importance against redundancy, in `[0, 1]` (default 0.07, the authors' code
    /// default; their README says 0.1).
    pub lambda: f64,
    /// Reproduce the authors' zeroing of `S[i][0]` for rows with no similar token (default
    /// false). See [`crate::reference::rkv::rkv_redundancy`].
    pub fidelity_quirk: bool,
}

impl RkvOptions {
    /// The authors' defaults (`buffer` 128, `alpha` 8, `kernel` 7, `lambda` 0.07, quirk off)
    /// with the given `budget` in tokens.
    pub fn new(budget: usize) -> RkvOptions {
        RkvOptions { budget, buffer: 128, alpha: 8, kernel: 7, lambda: 0.07, fidelity_quirk: false }
    }

    /// Checks the options: `alpha >= 1`, `budget > alpha` (the authors assert the same: a budget
    /// of only the window would ignore every score), `kernel` odd, `lambda` in `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if self.alpha == 0 {
            return Err(Error::invalid("alpha", "must be at least 1"));
        }
        if self.budget <= self.alpha {
            return Err(Error::invalid(
                "budget",
                format!("{} must exceed alpha {} (the window is always kept)", self.budget, self.alpha),
            ));
        }
        if self.kernel.is_multiple_of(2) {
            return Err(Error::invalid("kernel", format!("{} must be odd", self.kernel)));
        }
        if !(0.0..=1.0).contains(&self.lambda) {
            return Err(Error::invalid("lambda", format!("{} must lie in [0, 1]", self.lambda)));
        }
        Ok(())
    }

    /// Whether the automatic rule compacts a `Full` segment of `len` tokens:
    /// `len >= budget + buffer`.
    pub fn triggers(&self, len: usize) -> bool {
        len >= self.budget.saturating_add(self.buffer)
    }
}

/// Which segments an R-KV step ([`evict`], [`crate::reference::rkv::rkv_step`]) compacts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RkvTrigger<'a> {
    /// Every `Full` segment with `len >= budget + buffer` ([`RkvOptions::triggers`]).
    Threshold,
    /// Exactly the segments whose entry is `true` (one entry per segment), whatever their
    /// length; each must be `Full`. A forced segment of at most `budget` tokens keeps them all.
    Forced(&'a [bool]),
}

impl RkvTrigger<'_> {
    /// Which of `segments` this trigger selects (`Threshold`: the `Full` ones at `budget +
    /// buffer` tokens or more). Errors: a forced mask of the wrong length or naming a
    /// `Streaming` segment. Shared by [`evict`] and the reference step so both pick alike.
    pub fn select(&self, segments: &[Segment], opts: &RkvOptions) -> Result<Vec<bool>> {
        match *self {
            RkvTrigger::Threshold => Ok(segments
                .iter()
                .map(|s| s.mode == SegmentMode::Full && opts.triggers(s.len as usize))
                .collect()),
            RkvTrigger::Forced(mask) => {
                if mask.len() != segments.len() {
                    return Err(Error::invalid(
                        "trigger",
                        format!("{} entries, expected one per segment ({})", mask.len(), segments.len()),
                    ));
                }
                if let Some(i) =
                    (0..segments.len()).find(|&i| mask[i] && segments[i].mode != SegmentMode::Full)
                {
                    return Err(Error::invalid(
                        format!("trigger[{i}]"),
                        "Streaming segments are never compacted",
                    ));
                }
                Ok(mask.to_vec())
            }
        }
    }
}

/// A layer's rolling buffer of the last `alpha` queries of every query head, on the device.
///
/// Layout `[heads][alpha][head_dim]` (KV dtype), query head `h = segment * G + g` (the order of
/// the decode attention's `q`). Pushes fill slots `0, 1, ..` and then overwrite the oldest;
/// the scoring uses the `count = min(pushes, alpha)` queries held. The host twin is
/// [`crate::reference::rkv::QueryRing`].
pub struct QueryRing<S: Store, T: KvElem> {
    store: S,
    buf: S::Buf<T>,
    heads: usize,
    alpha: usize,
    head_dim: usize,
    next: usize,
    count: usize,
}

impl<S: Store, T: KvElem> QueryRing<S, T> {
    /// An empty ring for `heads` query heads (`batch * kv_heads * G`). Errors: a zero size,
    /// `alpha` above [`MAX_ALPHA`], an unsupported `head_dim`.
    pub fn new(store: &S, heads: usize, alpha: usize, head_dim: usize) -> Result<Self> {
        check_head_dim(head_dim)?;
        if heads == 0 || heads > i32::MAX as usize {
            return Err(Error::invalid("heads", format!("{heads} is outside 1..={}", i32::MAX)));
        }
        if alpha == 0 || alpha > MAX_ALPHA {
            return Err(Error::invalid("alpha", format!("{alpha} is outside 1..={MAX_ALPHA}")));
        }
        let elems = heads
            .checked_mul(alpha * head_dim)
            .ok_or_else(|| Error::invalid("heads", "heads * alpha * head_dim overflows"))?;
        Ok(QueryRing {
            store: store.clone(),
            buf: store.zeros(elems)?,
            heads,
            alpha,
            head_dim,
            next: 0,
            count: 0,
        })
    }

    /// Pushes one decode step's queries, `q`: `[heads][head_dim]` (the decode attention's `q`).
    pub fn push(&mut self, q: &S::Buf<T>) -> Result<()> {
        let want = self.heads * self.head_dim;
        if S::len(q) != want {
            return Err(Error::invalid(
                "q",
                format!("{} elements, expected heads * head_dim = {want}", S::len(q)),
            ));
        }
        let kernel = lookup(&format!("hw_query_push_d{}", self.head_dim), "head_dim")?;
        let store = &self.store;
        let mut pins = S::Pins::default();
        let params = HwQueryPushParams {
            ring: store.addr_mut("ring", &mut self.buf, &mut pins)? as *mut _,
            q: store.addr("q", q, &mut pins)? as *const _,
            heads: self.heads as i32,
            head_dim: self.head_dim as i32,
            alpha: self.alpha as i32,
            slot: self.next as i32,
        };
        check_aligned("q", params.q as u64)?;
        let vecs = self.heads * (self.head_dim / 8);
        // SAFETY: addresses from this store, pinned; q holds heads rows (checked), the ring
        // heads * alpha rows and slot < alpha.
        unsafe { store.launch(kernel, &launch_1d(vecs.div_ceil(256), 256, 0), &params)? };
        drop(pins);
        self.next = (self.next + 1) % self.alpha;
        self.count = (self.count + 1).min(self.alpha);
        Ok(())
    }

    /// Query heads.
    pub fn heads(&self) -> usize {
        self.heads
    }
    /// Queries kept per head.
    pub fn alpha(&self) -> usize {
        self.alpha
    }
    /// Valid queries per head: `min(pushes, alpha)`.
    pub fn count(&self) -> usize {
        self.count
    }
    /// The slot the next push writes.
    pub fn next_slot(&self) -> usize {
        self.next
    }
    /// The device buffer, `[heads][alpha][head_dim]` by slot.
    pub fn buf(&self) -> &S::Buf<T> {
        &self.buf
    }
}

/// Scratch memory of [`evict`], reused across steps and grown on demand. After a step it holds
/// that step's candidate scores and selections ([`RkvWorkspace::scores`], [`RkvWorkspace::kept`]).
///
/// Size: per compacted segment, about `len * (len / 32 + 5) * 4` bytes (the per-tile column
/// sums of the similarity matrix dominate: 2.2 MB at `len` 4224).
pub struct RkvWorkspace<S: Store> {
    importance: Option<S::Buf<f32>>,
    inv_norm: Option<S::Buf<f32>>,
    col_partial: Option<S::Buf<f32>>,
    col_mean: Option<S::Buf<f32>>,
    keys: Option<S::Buf<u32>>,
    kept: Option<S::Buf<i32>>,
    targets: Option<S::Buf<i32>>,
    last: Option<LastStep>,
}

impl<S: Store> Default for RkvWorkspace<S> {
    fn default() -> Self {
        RkvWorkspace {
            importance: None,
            inv_norm: None,
            col_partial: None,
            col_mean: None,
            keys: None,
            kept: None,
            targets: None,
            last: None,
        }
    }
}

/// What the last step compacted: (segment, old len) per target, max_len, budget, alpha.
type LastStep = (Vec<(usize, usize)>, usize, usize, usize);

impl<S: Store> RkvWorkspace<S> {
    /// An empty workspace.
    pub fn new() -> Self {
        Self::default()
    }

    fn last(&self) -> Result<&LastStep> {
        self.last.as_ref().ok_or_else(|| Error::invalid("workspace", "no eviction has run in this workspace"))
    }

    /// Per segment compacted by the last step: (segment, its `len - alpha` candidate scores).
    pub fn scores(&self, store: &S) -> Result<Vec<(usize, Vec<f32>)>> {
        let (targets, max_len, _, alpha) = self.last()?;
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let keys = store.download(self.keys.as_ref().expect("allocated by the last step"))?;
        Ok(targets
            .iter()
            .enumerate()
            .map(|(t, &(s, len))| {
                (
                    s,
                    keys[t * max_len..t * max_len + len - alpha]
                        .iter()
                        .map(|&k| crate::select::key_to_score(k))
                        .collect(),
                )
            })
            .collect())
    }

    /// Per segment compacted by the last step: (segment, kept positions ascending).
    pub fn kept(&self, store: &S) -> Result<Vec<(usize, Vec<u32>)>> {
        let (targets, _, budget, _) = self.last()?;
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let kept = store.download(self.kept.as_ref().expect("allocated by the last step"))?;
        Ok(targets
            .iter()
            .enumerate()
            .map(|(t, &(s, _))| (s, kept[t * budget..(t + 1) * budget].iter().map(|&p| p as u32).collect()))
            .collect())
    }
}

/// One R-KV step over a layer (see the [module docs](self)): scores and compacts, in place,
/// every segment `trigger` selects that holds more than `opts.budget` tokens (a selected
/// segment of at most `budget` tokens is left as it is). `ring` holds the layer's recent
/// queries, `num_segments * group_size` heads; segment `s` scores with query heads
/// `s * G .. (s + 1) * G`. Returns, per segment, whether it was compacted; a compacted
/// segment's `len` becomes `budget` (host layout and device table alike).
///
/// Errors before any launch: invalid options ([`RkvOptions::validate`]), `alpha` above
/// [`MAX_ALPHA`], a group size outside 1..=16, a ring of another shape, head_dim or `alpha`, a
/// forced mask of the wrong length or naming a `Streaming` segment, a segment to score while
/// the ring is empty.
pub fn evict<S: Store, T: KvElem>(
    cache: &mut LayerCache<S, T>,
    ring: &QueryRing<S, T>,
    group_size: usize,
    opts: &RkvOptions,
    trigger: RkvTrigger<'_>,
    ws: &mut RkvWorkspace<S>,
) -> Result<Vec<bool>> {
    opts.validate()?;
    if opts.alpha > MAX_ALPHA {
        return Err(Error::invalid("alpha", format!("{} exceeds {MAX_ALPHA}", opts.alpha)));
    }
    if opts.budget > i32::MAX as usize {
        return Err(Error::invalid("budget", format!("{} exceeds int32 ({})", opts.budget, i32::MAX)));
    }
    if opts.kernel > i32::MAX as usize {
        return Err(Error::invalid("kernel", format!("{} exceeds int32 ({})", opts.kernel, i32::MAX)));
    }
    if group_size == 0 || group_size > MAX_GROUP {
        return Err(Error::invalid("group_size", format!("{group_size} is outside 1..={MAX_GROUP}")));
    }
    let segs: Vec<Segment> = cache.layout().segments().to_vec();
    if ring.heads != segs.len() * group_size {
        return Err(Error::invalid(
            "ring",
            format!("{} heads, expected num_segments {} * group_size {group_size}", ring.heads, segs.len()),
        ));
    }
    if ring.alpha != opts.alpha {
        return Err(Error::invalid(
            "ring",
            format!("alpha {} differs from opts.alpha {}", ring.alpha, opts.alpha),
        ));
    }
    if ring.head_dim != cache.head_dim() {
        return Err(Error::invalid(
            "ring",
            format!("head_dim {} differs from the cache's {}", ring.head_dim, cache.head_dim()),
        ));
    }
    let selected = trigger.select(&segs, opts)?;
    let targets: Vec<(usize, usize)> = (0..segs.len())
        .filter(|&i| selected[i] && segs[i].len as usize > opts.budget)
        .map(|i| (i, segs[i].len as usize))
        .collect();
    let mut done = vec![false; segs.len()];
    if targets.is_empty() {
        ws.last = Some((Vec::new(), 0, opts.budget, opts.alpha));
        return Ok(done);
    }
    if ring.count == 0 {
        return Err(Error::invalid(
            "ring",
            format!("segment {} must be scored but no query has been pushed yet", targets[0].0),
        ));
    }
    let max_len = targets.iter().map(|&(_, l)| l).max().expect("non-empty");
    let tiles = max_len.div_ceil(SLAB_ROWS);
    if tiles > 65535 {
        return Err(Error::invalid(
            "len",
            format!("{max_len} tokens exceed the {} a step supports", 65535 * SLAB_ROWS),
        ));
    }
    let nt = targets.len();
    let store = cache.store().clone();
    let per = nt * max_len;
    ensure(&store, &mut ws.importance, per)?;
    ensure(&store, &mut ws.inv_norm, per)?;
    ensure(&store, &mut ws.col_mean, per)?;
    ensure(&store, &mut ws.keys, per)?;
    let partial = nt
        .checked_mul(tiles)
        .and_then(|x| x.checked_mul(max_len))
        .ok_or_else(|| Error::invalid("len", "the similarity workspace overflows usize"))?;
    ensure(&store, &mut ws.col_partial, partial)?;
    ensure(&store, &mut ws.kept, nt * opts.budget)?;
    ws.last = None;
    // The target list goes into a workspace buffer sized for every segment, so a decode loop
    // allocates it once instead of at every eviction.
    ensure(&store, &mut ws.targets, segs.len())?;
    let target_buf = ws.targets.as_mut().expect("ensured");
    let mut target_ids = vec![0i32; S::len(target_buf)];
    for (slot, &(s, _)) in target_ids.iter_mut().zip(&targets) {
        *slot = s as i32;
    }
    store.overwrite(target_buf, &target_ids)?;

    // Debug mode: the rows before the in-place compaction, to check it afterwards.
    let before = if crate::invariants::enabled() {
        Some((store.download(cache.k())?, store.download(cache.v())?))
    } else {
        None
    };
    let d = cache.head_dim();
    let dt = T::DTYPE.name();
    let k_imp = lookup(&format!("hw_rkv_importance_{dt}_d{d}"), "head_dim")?;
    let k_norm = lookup(&format!("hw_rkv_norms_{dt}_d{d}"), "head_dim")?;
    let k_sim = lookup(&format!("hw_rkv_similarity_{dt}_d{d}"), "head_dim")?;
    let k_sel = lookup(&format!("hw_rkv_select_d{d}"), "head_dim")?;
    let n = segs.len();
    {
        let (store, k_cache, v_cache, table) = cache.parts_mut();
        let mut pins = S::Pins::default();
        let params = HwRkvParams {
            k_cache: store.addr_mut("k_cache", k_cache, &mut pins)? as *mut _,
            v_cache: store.addr_mut("v_cache", v_cache, &mut pins)? as *mut _,
            seg: DeviceTable::params(store.addr_mut("device_table", table, &mut pins)?, n),
            targets: store.addr("targets", ws.targets.as_ref().expect("ensured"), &mut pins)? as *const i32,
            num_targets: nt as i32,
            ring: store.addr("ring", &ring.buf, &mut pins)? as *const _,
            ring_count: ring.count as i32,
            group_size: group_size as i32,
            head_dim: d as i32,
            alpha: opts.alpha as i32,
            budget: opts.budget as i32,
            pool_kernel: opts.kernel as i32,
            max_len: max_len as i32,
            fidelity_quirk: opts.fidelity_quirk as i32,
            lambda: opts.lambda as f32,
            scale_log2: (1.0 / (d as f32).sqrt()) * std::f32::consts::LOG2_E,
            importance: store.addr_mut("importance", ws.importance.as_mut().expect("ensured"), &mut pins)?
                as *mut f32,
            inv_norm: store.addr_mut("inv_norm", ws.inv_norm.as_mut().expect("ensured"), &mut pins)?
                as *mut f32,
            col_partial: store.addr_mut(
                "col_partial",
                ws.col_partial.as_mut().expect("ensured"),
                &mut pins,
            )? as *mut f32,
            col_mean: store.addr_mut("col_mean", ws.col_mean.as_mut().expect("ensured"), &mut pins)?
                as *mut f32,
            keys: store.addr_mut("keys", ws.keys.as_mut().expect("ensured"), &mut pins)? as *mut u32,
            kept: store.addr_mut("kept", ws.kept.as_mut().expect("ensured"), &mut pins)? as *mut i32,
        };
        let by_tiles = |y: usize, threads: u32| HwLaunch { grid_y: y as u32, ..launch_1d(nt, threads, 0) };
        // SAFETY (all four launches): addresses from this store, pinned until the block ends.
        // Every target is a validated Full segment with alpha < budget < len <= capacity, so
        // its rows lie inside k/v; the ring holds num_segments * G * alpha rows of head_dim
        // (checked) and ring_count <= alpha; the workspace buffers hold num_targets * max_len
        // (importance, inv_norm, col_mean, keys), num_targets * ceil(max_len / 32) * max_len
        // (col_partial) and num_targets * budget (kept) elements.
        unsafe {
            store.launch(k_imp, &launch_1d(nt, TILE_THREADS, 0), &params)?;
            store.launch(
                k_norm,
                &by_tiles(max_len.div_ceil(TILE_THREADS as usize), TILE_THREADS),
                &params,
            )?;
            store.launch(k_sim, &by_tiles(tiles, TILE_THREADS), &params)?;
            store.launch(k_sel, &launch_1d(nt, SELECT_THREADS, 0), &params)?;
        }
        drop(pins);
    }
    let mut new_segs = segs;
    for &(s, _) in &targets {
        new_segs[s].len = opts.budget as u32;
        done[s] = true;
    }
    let l = cache.layout();
    let layout = LayerLayout::new(l.batch(), l.kv_heads(), l.total_rows() as u64, new_segs)?;
    cache.set_host_layout(layout);
    ws.last = Some((targets, max_len, opts.budget, opts.alpha));
    if let Some((k0, v0)) = before {
        let (k1, v1) = (store.download(cache.k())?, store.download(cache.v())?);
        let op = "redundancy::evict";
        for ((s, kept), &(_, old_len)) in ws.kept(&store)?.into_iter().zip(&ws.last.as_ref().expect("set").0)
        {
            let what = format!("segment {s}");
            crate::invariants::check_selection(op, &what, &kept, old_len, opts.alpha, opts.budget)?;
            // Full segments: token i at row offset + i, before and after.
            let off = cache.layout().segments()[s].offset as usize;
            let pairs: Vec<(usize, usize)> =
                kept.iter().enumerate().map(|(i, &p)| (off + p as usize, off + i)).collect();
            crate::invariants::check_rows(op, &format!("{what} K"), &k0, &k1, &pairs, d)?;
            crate::invariants::check_rows(op, &format!("{what} V"), &v0, &v1, &pairs, d)?;
        }
    }
    Ok(done)
}
