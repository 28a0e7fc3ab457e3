//! H2O-style heavy hitters (issue 16): evict by accumulated attention mass, `cuda/heavy_hitters.cu`.
//!
//! The decode loop keeps one f32 buffer per layer, `mass`, one entry per cache row (a
//! `store.zeros::<f32>(layout.total_rows())`), and calls
//! [`LayerCache::attention_with_mass`] instead of [`LayerCache::attention`]: every cached token's
//! entry accumulates the attention probability it receives, summed over the query heads of its
//! GQA group (H2O accumulates the softmax probability; kvpress and H2O sum over the group).
//! [`evict_by_mass`] then compacts every `Full` segment that holds more than `budget` tokens
//! to `budget`: the `recent` newest tokens always stay, and of the older ones the
//! `budget - recent` with the most accumulated mass (the heavy hitters), in position order. K,
//! V and the mass entries move together, in place; the freed rows' mass is zeroed, so a token
//! appended there later starts from zero. `Streaming` segments are left alone (their ring
//! already bounds them).
//!
//! Selections are deterministic: NaN mass ranks lowest, ties go to the lower position (the
//! order of [`crate::reference::select_positions`]). The reference is
//! [`crate::reference::h2o`].

use crate::cache::LayerCache;
use crate::dtype::KvElem;
use crate::error::{Error, Result};
use crate::kernels::{launch_1d, lookup};
use crate::layout::{DeviceTable, LayerLayout, Segment, SegmentMode};
use crate::params::HwH2oParams;
use crate::store::{KernelParams, Store, ensure};

// SAFETY: generated from cuda/params.h (repr(C) plain data); the kernels in
// cuda/heavy_hitters.cu take exactly this struct by value.
unsafe impl KernelParams for HwH2oParams {}
// SAFETY: repr(C) plain data, passed by value as a kernel argument.
#[cfg(feature = "cuda")]
unsafe impl cudarc::driver::DeviceRepr for HwH2oParams {}

const EVICT_THREADS: u32 = 256;

/// Options of [`evict_by_mass`]. Counts are tokens (rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2oOptions {
    /// Tokens a `Full` segment keeps after the eviction, `recent` included; at least 1.
    pub budget: usize,
    /// The newest tokens that always stay (H2O's recent window), at most `budget`.
    pub recent: usize,
}

impl H2oOptions {
    /// Checks `1 <= budget <= i32::MAX` and `recent <= budget`.
    pub fn validate(&self) -> Result<()> {
        if self.budget == 0 || self.budget > i32::MAX as usize {
            return Err(Error::invalid("budget", format!("{} is outside 1..={}", self.budget, i32::MAX)));
        }
        if self.recent > self.budget {
            return Err(Error::invalid(
                "recent",
                format!("{} exceeds budget {} (the recent tokens are part of it)", self.recent, self.budget),
            ));
        }
        Ok(())
    }

    /// Which of `segments` an eviction compacts: the `Full` ones holding more than `budget`.
    pub fn targets(&self, segments: &[Segment]) -> Vec<bool> {
        segments.iter().map(|s| s.mode == SegmentMode::Full && s.len as usize > self.budget).collect()
    }
}

/// Scratch memory of [`evict_by_mass`], reused across calls and grown on demand. After a call
/// it holds that call's selections ([`H2oWorkspace::kept`]).
pub struct H2oWorkspace<S: Store> {
    keys: Option<S::Buf<u32>>,
    kept: Option<S::Buf<i32>>,
    targets: Option<S::Buf<i32>>,
    /// Segments compacted by the last call, and its budget.
    last: Option<(Vec<usize>, usize)>,
}

impl<S: Store> Default for H2oWorkspace<S> {
    fn default() -> Self {
        H2oWorkspace { keys: None, kept: None, targets: None, last: None }
    }
}

impl<S: Store> H2oWorkspace<S> {
    /// An empty workspace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Per segment compacted by the last call: (segment, kept positions ascending, `budget` of
    /// them, as positions before the compaction).
    pub fn kept(&self, store: &S) -> Result<Vec<(usize, Vec<u32>)>> {
        let (targets, budget) = self
            .last
            .as_ref()
            .ok_or_else(|| Error::invalid("workspace", "no eviction has run in this workspace"))?;
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let kept = store.download(self.kept.as_ref().expect("allocated by the last call"))?;
        Ok(targets
            .iter()
            .enumerate()
            .map(|(t, &s)| (s, kept[t * budget..(t + 1) * budget].iter().map(|&p| p as u32).collect()))
            .collect())
    }
}

/// H2O's eviction over a layer (see the [module docs](self)): every `Full` segment holding
/// more than `opts.budget` tokens keeps its `opts.recent` newest tokens and the
/// `budget - recent` older ones with the most accumulated `mass` (NaN lowest, ties to the lower
/// position), compacted in place in position order, K, V and mass alike; its `len` becomes
/// `budget` (host layout and device table). `mass` is the buffer
/// [`LayerCache::attention_with_mass`] accumulates into, one f32 per cache row; the mass of the
/// rows a compaction frees is zeroed. Returns, per segment, whether it was compacted. One
/// launch when something is compacted, none otherwise.
///
/// Errors before any launch: invalid options ([`H2oOptions::validate`]), a `mass` buffer whose
/// length is not `total_rows`.
///
/// ```
/// use headwise::heavy_hitters::{H2oOptions, H2oWorkspace, evict_by_mass};
/// use headwise::{EmuStore, LayerCache, LayoutBuilder, Store};
/// use half::f16;
/// // One Full segment of 6 tokens; keep 3: the newest one plus the 2 heaviest older ones.
/// let layout = LayoutBuilder::new(1, 1).full(0, 0, 6).build()?;
/// let mut cache = LayerCache::<_, f16>::new(&EmuStore, layout, 64)?;
/// let mut mass = EmuStore.upload(&[0.5f32, 3.0, 0.1, 2.0, 2.0, 0.0])?;
/// let mut ws = H2oWorkspace::new();
/// let done = evict_by_mass(&mut cache, &mut mass, &H2oOptions { budget: 3, recent: 1 }, &mut ws)?;
/// assert_eq!(done, vec![true]);
/// // Tokens 1 and 3 (3.0, and 2.0 before the tie at 4) and the newest, 5.
/// assert_eq!(ws.kept(&EmuStore)?, vec![(0, vec![1, 3, 5])]);
/// assert_eq!(cache.layout().segments()[0].len, 3);
/// assert_eq!(EmuStore.download(&mass)?, vec![3.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
/// # Ok::<(), headwise::Error>(())
/// ```
pub fn evict_by_mass<S: Store, T: KvElem>(
    cache: &mut LayerCache<S, T>,
    mass: &mut S::Buf<f32>,
    opts: &H2oOptions,
    ws: &mut H2oWorkspace<S>,
) -> Result<Vec<bool>> {
    opts.validate()?;
    let rows = cache.layout().total_rows();
    if S::len(mass) != rows {
        return Err(Error::invalid(
            "mass",
            format!("{} elements, expected one per cache row (total_rows {rows})", S::len(mass)),
        ));
    }
    let store = cache.store().clone();
    store.check_buf("mass", mass)?;
    let segs: Vec<Segment> = cache.layout().segments().to_vec();
    let done = opts.targets(&segs);
    let targets: Vec<usize> = (0..segs.len()).filter(|&i| done[i]).collect();
    if targets.is_empty() {
        ws.last = Some((Vec::new(), opts.budget));
        return Ok(done);
    }
    let nt = targets.len();
    let max_len = targets.iter().map(|&s| segs[s].len as usize).max().expect("non-empty");
    ws.last = None;
    ensure(&store, &mut ws.keys, nt * max_len)?;
    ensure(&store, &mut ws.kept, nt * opts.budget)?;
    ensure(&store, &mut ws.targets, segs.len())?;
    let target_buf = ws.targets.as_mut().expect("ensured");
    let mut ids = vec![0i32; S::len(target_buf)];
    for (slot, &s) in ids.iter_mut().zip(&targets) {
        *slot = s as i32;
    }
    store.overwrite(target_buf, &ids)?;
    let before = if crate::invariants::enabled() {
        Some((store.download(cache.k())?, store.download(cache.v())?))
    } else {
        None
    };
    let d = cache.head_dim();
    let kernel = lookup(&format!("hw_h2o_evict_d{d}"), "head_dim")?;
    let n = segs.len();
    {
        let (store, k_cache, v_cache, table) = cache.parts_mut();
        let mut pins = S::Pins::default();
        let params = HwH2oParams {
            q: std::ptr::null(),
            k_cache: store.addr_mut("k_cache", k_cache, &mut pins)? as *mut _,
            v_cache: store.addr_mut("v_cache", v_cache, &mut pins)? as *mut _,
            seg: DeviceTable::params(store.addr_mut("device_table", table, &mut pins)?, n),
            lse: std::ptr::null(),
            mass: store.addr_mut("mass", mass, &mut pins)? as *mut f32,
            targets: store.addr("targets", ws.targets.as_ref().expect("ensured"), &mut pins)? as *const i32,
            keys: store.addr_mut("keys", ws.keys.as_mut().expect("ensured"), &mut pins)? as *mut u32,
            kept: store.addr_mut("kept", ws.kept.as_mut().expect("ensured"), &mut pins)? as *mut i32,
            num_targets: nt as i32,
            group_size: 0,
            head_dim: d as i32,
            tokens_per_block: 0,
            budget: opts.budget as i32,
            recent: opts.recent as i32,
            max_len: max_len as i32,
            scale_log2: 0.0,
        };
        // SAFETY: addresses from this store, pinned until the block ends. Every target is a
        // validated Full segment with recent <= budget < len <= capacity, so its rows lie inside
        // k/v and mass (total_rows entries, checked); keys holds num_targets * max_len entries,
        // kept num_targets * budget, targets num_segments.
        unsafe { store.launch(kernel, &launch_1d(nt, EVICT_THREADS, 0), &params)? };
        drop(pins);
    }
    let mut new_segs = segs.clone();
    for &s in &targets {
        new_segs[s].len = opts.budget as u32;
    }
    let l = cache.layout();
    let layout = LayerLayout::new(l.batch(), l.kv_heads(), l.total_rows() as u64, new_segs)?;
    cache.set_host_layout(layout);
    ws.last = Some((targets, opts.budget));
    if let Some((k0, v0)) = before {
        let (k1, v1) = (store.download(cache.k())?, store.download(cache.v())?);
        let op = "heavy_hitters::evict_by_mass";
        for (s, kept) in ws.kept(&store)? {
            let what = format!("segment {s}");
            let old_len = segs[s].len as usize;
            crate::invariants::check_selection(op, &what, &kept, old_len, opts.recent, opts.budget)?;
            let off = segs[s].offset as usize;
            let pairs: Vec<(usize, usize)> =
                kept.iter().enumerate().map(|(i, &p)| (off + p as usize, off + i)).collect();
            crate::invariants::check_rows(op, &format!("{what} K"), &k0, &k1, &pairs, d)?;
            crate::invariants::check_rows(op, &format!("{what} V"), &v0, &v1, &pairs, d)?;
        }
    }
    Ok(done)
}
