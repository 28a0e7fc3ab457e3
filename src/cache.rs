//! [`LayerCache`]: one layer's K/V buffers, its segment table on the device, and the host's
//! authoritative [`LayerLayout`], with the operations over them (append, regrow; attention and
//! compression in later modules).
//!
//! Buffer layout: K and V are each `[total_rows][head_dim]` elements, row-major; segment rows as
//! described in [`crate::layout`]. New tokens for [`LayerCache::append`] are
//! `[num_segments][head_dim]`, i.e. the model's `[batch][kv_heads][head_dim]` for one step; for
//! [`LayerCache::append_tokens`], `[batch][tokens][kv_heads][head_dim]`.

use crate::dtype::{KvElem, check_head_dim};
use crate::error::{Error, Result};
use crate::kernels::{launch_1d, lookup};
use crate::layout::{DeviceTable, LayerLayout, Segment, SegmentMode};
use crate::params::{HwAppendParams, HwRelayoutParams};
use crate::store::{KernelParams, Store, check_aligned};

// SAFETY: generated from cuda/params.h (repr(C) plain data); the kernels in cuda/append.cu take
// exactly these structs by value.
unsafe impl KernelParams for HwAppendParams {}
unsafe impl KernelParams for HwRelayoutParams {}
// SAFETY: repr(C) plain data (pointers and integers), passed by value as a kernel argument.
#[cfg(feature = "cuda")]
unsafe impl cudarc::driver::DeviceRepr for HwAppendParams {}
#[cfg(feature = "cuda")]
unsafe impl cudarc::driver::DeviceRepr for HwRelayoutParams {}

/// Warps per block of the append kernel (one segment per warp); matches `kAppendWarpsPerBlock`
/// in cuda/append.cu.
const APPEND_WARPS_PER_BLOCK: usize = 4;
const RELAYOUT_THREADS: u32 = 256;

/// One layer's ragged K/V cache in a [`Store`].
pub struct LayerCache<S: Store, T: KvElem> {
    store: S,
    layout: LayerLayout,
    head_dim: usize,
    k: S::Buf<T>,
    v: S::Buf<T>,
    table: S::Buf<i32>,
}

impl<S: Store, T: KvElem> LayerCache<S, T> {
    /// Allocates zeroed K/V buffers for `layout` and uploads its segment table.
    pub fn new(store: &S, layout: LayerLayout, head_dim: usize) -> Result<Self> {
        check_head_dim(head_dim)?;
        let elems = elems(&layout, head_dim)?;
        let k = store.zeros(elems)?;
        let v = store.zeros(elems)?;
        Self::from_parts(store, layout, head_dim, k, v)
    }

    /// Wraps existing K/V buffers (e.g. engine memory via [`crate::gpu::GpuBuf::borrowed`]),
    /// each `layout.total_rows() * head_dim` elements, and uploads the segment table.
    pub fn from_parts(
        store: &S,
        layout: LayerLayout,
        head_dim: usize,
        k: S::Buf<T>,
        v: S::Buf<T>,
    ) -> Result<Self> {
        check_head_dim(head_dim)?;
        let elems = elems(&layout, head_dim)?;
        for (field, buf) in [("k", &k), ("v", &v)] {
            if S::len(buf) != elems {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{} elements, layout needs total_rows {} * head_dim {head_dim} = {elems}",
                        S::len(buf),
                        layout.total_rows()
                    ),
                ));
            }
            let mut pins = S::Pins::default();
            check_aligned(field, store.addr(field, buf, &mut pins)?)?;
        }
        let table = store.upload(&layout.device_table())?;
        Ok(LayerCache { store: store.clone(), layout, head_dim, k, v, table })
    }

    /// The host's copy of the segment table (always current: every operation updates it).
    pub fn layout(&self) -> &LayerLayout {
        &self.layout
    }
    /// Elements per row.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// The store the buffers live in.
    pub fn store(&self) -> &S {
        &self.store
    }
    /// The K buffer, `[total_rows][head_dim]`.
    pub fn k(&self) -> &S::Buf<T> {
        &self.k
    }
    /// The V buffer, `[total_rows][head_dim]`.
    pub fn v(&self) -> &S::Buf<T> {
        &self.v
    }
    /// The device segment table (int32, see [`LayerLayout::device_table`]).
    pub fn device_table(&self) -> &S::Buf<i32> {
        &self.table
    }
    /// Gives back the K and V buffers and the layout.
    pub fn into_parts(self) -> (LayerLayout, S::Buf<T>, S::Buf<T>) {
        (self.layout, self.k, self.v)
    }

    /// The store, both cache buffers and the device table, for kernels that write the cache.
    #[allow(clippy::type_complexity)]
    pub(crate) fn parts_mut(&mut self) -> (&S, &mut S::Buf<T>, &mut S::Buf<T>, &mut S::Buf<i32>) {
        (&self.store, &mut self.k, &mut self.v, &mut self.table)
    }

    /// Replaces the layout by `layout` (same buffers, revalidated) and rewrites the device table.
    pub(crate) fn set_layout(&mut self, layout: LayerLayout) -> Result<()> {
        if layout.total_rows() != self.layout.total_rows() {
            return Err(Error::invalid("layout", "total_rows must match the cache buffers"));
        }
        self.store.overwrite(&mut self.table, &layout.device_table())?;
        self.layout = layout;
        Ok(())
    }

    /// Replaces the host layout after a kernel applied the same change to the device table.
    pub(crate) fn set_host_layout(&mut self, layout: LayerLayout) {
        debug_assert_eq!(layout.total_rows(), self.layout.total_rows());
        self.layout = layout;
    }

    /// Appends one token to every segment: `k_new`/`v_new` are `[num_segments][head_dim]`.
    /// `Full` segments write row `len`; `Streaming` segments fill their sinks, then their ring.
    ///
    /// Errors before any launch: wrong buffer lengths or alignment, or [`Error::SegmentFull`]
    /// when a `Full` segment has no room (compress it or [`LayerCache::regrow`] first).
    pub fn append(&mut self, k_new: &S::Buf<T>, v_new: &S::Buf<T>) -> Result<()> {
        self.append_tokens(k_new, v_new, 1)
    }

    /// Appends `tokens` tokens to every segment in one launch, oldest first, exactly as
    /// `tokens` calls of [`LayerCache::append`] would (a chunk of prefill, a follow-up turn, or
    /// speculative draft tokens before [`LayerCache::attention_chunk`] verifies them).
    /// `k_new`/`v_new` are token-major, `[batch][tokens][kv_heads][head_dim]`; one token is the
    /// `[num_segments][head_dim]` of [`LayerCache::append`]. A `Streaming` segment given more
    /// tokens than its window keeps only the newest `window` of them in its ring.
    ///
    /// Errors before any launch: `tokens` 0 or above `i32::MAX`, wrong buffer lengths or
    /// alignment, or [`Error::SegmentFull`] when a `Full` segment has fewer than `tokens` free
    /// rows; nothing is written then.
    pub fn append_tokens(&mut self, k_new: &S::Buf<T>, v_new: &S::Buf<T>, tokens: usize) -> Result<()> {
        if tokens == 0 || tokens > i32::MAX as usize {
            return Err(Error::invalid("tokens", format!("{tokens} is outside 1..={}", i32::MAX)));
        }
        let n = self.layout.segments().len();
        let want = n.checked_mul(tokens).and_then(|r| r.checked_mul(self.head_dim));
        for (field, buf) in [("k_new", k_new), ("v_new", v_new)] {
            if Some(S::len(buf)) != want {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{} elements, expected num_segments {n} * tokens {tokens} * head_dim {}",
                        S::len(buf),
                        self.head_dim
                    ),
                ));
            }
        }
        self.layout.check_room(tokens)?;
        let kernel = lookup(&format!("hw_append_d{}", self.head_dim), "head_dim")?;
        let cfg = launch_1d(n.div_ceil(APPEND_WARPS_PER_BLOCK), (32 * APPEND_WARPS_PER_BLOCK) as u32, 0);
        let store = &self.store;
        let mut pins = S::Pins::default();
        let params = HwAppendParams {
            k_cache: store.addr_mut("k", &mut self.k, &mut pins)? as *mut _,
            v_cache: store.addr_mut("v", &mut self.v, &mut pins)? as *mut _,
            k_new: store.addr("k_new", k_new, &mut pins)? as *const _,
            v_new: store.addr("v_new", v_new, &mut pins)? as *const _,
            seg: DeviceTable::params(store.addr_mut("device_table", &mut self.table, &mut pins)?, n),
            head_dim: self.head_dim as i32,
            tokens: tokens as i32,
            kv_heads: self.layout.kv_heads() as i32,
        };
        check_aligned("k_new", params.k_new as u64)?;
        check_aligned("v_new", params.v_new as u64)?;
        // SAFETY: every address comes from this store and is pinned; the layout was validated
        // (all segment rows inside k/v), every Full segment has room for `tokens` rows, and the
        // new-token buffers hold num_segments * tokens rows: every row the kernel forms is in
        // bounds.
        unsafe { store.launch(kernel, &cfg, &params)? };
        drop(pins);
        self.layout.advance_all(tokens);
        Ok(())
    }

    /// Drops the newest `tokens[b]` tokens of every segment of sequence `b` (`tokens` has
    /// `batch` entries): the rejection of speculative draft tokens that
    /// [`LayerCache::append_tokens`] appended and [`LayerCache::attention_chunk`] did not
    /// accept. No row moves; each segment's `len` (and a ring's state) steps back, and the next
    /// append reuses the rows.
    ///
    /// A `Full` segment is restored exactly. A `Streaming` segment is restored exactly while
    /// its ring had not wrapped; once it had, each draft overwrote one of the oldest windowed
    /// tokens, and those cannot come back: the ring then holds `len` minus the dropped tokens
    /// (fewer than `window`) until later appends fill it again. Drafts are the newest tokens
    /// only when no more than `window` of them were appended to a `Streaming` segment.
    ///
    /// Errors before anything changes: `tokens` without `batch` entries, or a count above the
    /// length of one of its sequence's segments (named as `tokens[b]`).
    pub fn rollback(&mut self, tokens: &[u32]) -> Result<()> {
        let target = self.layout.rolled_back(tokens)?;
        self.set_layout(target)
    }

    /// Moves every segment to a new layout in which each `Full` segment has `len + headroom`
    /// rows ([`LayerLayout::regrown`]): new buffers, one O(total rows) copy, the old buffers
    /// freed. Meant to be amortized: call it when [`LayerLayout::check_appendable`] fails, not
    /// every step.
    pub fn regrow(&mut self, headroom: u32) -> Result<()> {
        let target = self.layout.regrown(headroom)?;
        let elems = elems(&target, self.head_dim)?;
        let mut k = self.store.zeros(elems)?;
        let mut v = self.store.zeros(elems)?;
        self.relayout_into(&target, &mut k, &mut v)?;
        let table = self.store.upload(&target.device_table())?;
        if crate::invariants::enabled() {
            // Every logical token of every segment (sinks and ring included) kept byte for byte.
            let (k0, v0) = (self.store.download(&self.k)?, self.store.download(&self.v)?);
            let (k1, v1) = (self.store.download(&k)?, self.store.download(&v)?);
            for (s, (a, b)) in self.layout.segments().iter().zip(target.segments()).enumerate() {
                let pairs: Vec<(usize, usize)> =
                    (0..a.len).map(|i| (a.row(i) as usize, b.row(i) as usize)).collect();
                let what = format!("segment {s}");
                crate::invariants::check_rows(
                    "regrow",
                    &format!("{what} K"),
                    &k0,
                    &k1,
                    &pairs,
                    self.head_dim,
                )?;
                crate::invariants::check_rows(
                    "regrow",
                    &format!("{what} V"),
                    &v0,
                    &v1,
                    &pairs,
                    self.head_dim,
                )?;
            }
        }
        self.k = k;
        self.v = v;
        self.table = table;
        self.layout = target;
        Ok(())
    }

    /// Copies every segment's rows into `k_dst`/`v_dst` arranged as `target`, which must hold the
    /// same segments (mode, len, ring state) at other offsets with at least their capacity.
    /// The engine-memory form of [`LayerCache::regrow`]: the caller owns the new buffers.
    pub fn relayout_into(
        &self,
        target: &LayerLayout,
        k_dst: &mut S::Buf<T>,
        v_dst: &mut S::Buf<T>,
    ) -> Result<()> {
        let src = self.layout.segments();
        let dst = target.segments();
        if target.batch() != self.layout.batch() || target.kv_heads() != self.layout.kv_heads() {
            return Err(Error::invalid("target", "batch and kv_heads must match the current layout"));
        }
        for (i, (a, b)) in src.iter().zip(dst).enumerate() {
            if a.mode != b.mode || a.len != b.len || a.ring_head != b.ring_head {
                return Err(Error::invalid(
                    format!("target.segments[{i}]"),
                    "must keep the segment's mode, len and ring_head".to_string(),
                ));
            }
            if a.len > b.capacity {
                return Err(Error::invalid(
                    format!("target.segments[{i}].capacity"),
                    format!("{} < len {}", b.capacity, a.len),
                ));
            }
        }
        let elems = elems(target, self.head_dim)?;
        for (field, buf) in [("k_dst", &*k_dst), ("v_dst", &*v_dst)] {
            if S::len(buf) != elems {
                return Err(Error::invalid(field, format!("{} elements, target needs {elems}", S::len(buf))));
            }
        }
        let n = src.len();
        let offsets: Vec<i32> = src
            .iter()
            .map(|s| s.offset as i32)
            .chain(dst.iter().map(|s| s.offset as i32))
            .chain(src.iter().map(|s| physical_rows(s) as i32))
            .collect();
        let meta = self.store.upload(&offsets)?;
        let kernel = lookup(&format!("hw_relayout_d{}", self.head_dim), "head_dim")?;
        let cfg = launch_1d(n, RELAYOUT_THREADS, 0);
        let store = &self.store;
        let mut pins = S::Pins::default();
        let meta_addr = store.addr("relayout metadata", &meta, &mut pins)?;
        let params = HwRelayoutParams {
            k_src: store.addr("k", &self.k, &mut pins)? as *const _,
            v_src: store.addr("v", &self.v, &mut pins)? as *const _,
            k_dst: store.addr_mut("k_dst", k_dst, &mut pins)? as *mut _,
            v_dst: store.addr_mut("v_dst", v_dst, &mut pins)? as *mut _,
            src_offset: meta_addr as *const i32,
            dst_offset: (meta_addr + 4 * n as u64) as *const i32,
            len: (meta_addr + 8 * n as u64) as *const i32,
            num_segments: n as i32,
            head_dim: self.head_dim as i32,
        };
        check_aligned("k_dst", params.k_dst as u64)?;
        check_aligned("v_dst", params.v_dst as u64)?;
        // SAFETY: both layouts are validated, each segment's physical_rows (len, or a Streaming
        // capacity, equal in both since the modes match) fit its source and target capacity, and the destination buffers hold target.total_rows rows.
        unsafe { store.launch(kernel, &cfg, &params)? };
        drop(pins);
        // Dropping `meta` here is safe: both stores free in stream order (cudarc frees
        // asynchronously on the buffer's stream; the emulator has finished already).
        Ok(())
    }
}

/// The leading rows of a segment that hold its tokens: `len`, except a ring that a rollback
/// left not full with `ring_head != 0`, whose tokens can sit anywhere in its `capacity` rows.
fn physical_rows(s: &Segment) -> u32 {
    match s.mode {
        SegmentMode::Streaming { .. } if s.ring_head != 0 => s.capacity,
        _ => s.len,
    }
}

fn elems(layout: &LayerLayout, head_dim: usize) -> Result<usize> {
    layout
        .total_rows()
        .checked_mul(head_dim)
        .ok_or_else(|| Error::invalid("total_rows", "total_rows * head_dim overflows usize"))
}
