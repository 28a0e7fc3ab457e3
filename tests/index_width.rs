//! Index width at the largest supported cache (issue 14).
//!
//! The largest cache this crate plans for is 32 sequences x 8 KV heads x 128k tokens at
//! head_dim 256: 2^25 rows, 2^33 elements, 16 GiB per K or V buffer. Rows fit int32 (the
//! layout's bound, [`MAX_ROWS`]); element and byte offsets do not fit 32 bits, so every kernel
//! must form them in 64 bits. Two checks:
//!
//! 1. `largest_cache_launches_fit_hardware_limits`: every operation (append, decode attention
//!    with its split merge, H2O mass and eviction, SnapKV/AdaKV selection, R-KV eviction, query
//!    push, relayout) is planned on that cache through a store that records launches instead of
//!    running them, and every grid, block and dynamic shared-memory size must be within sm_90
//!    limits.
//! 2. `kernels_address_rows_past_32_bit_offsets`: the emulator runs the kernels on a layout
//!    whose second segment sits at the far end of a 2^25-row buffer (byte offsets near 2^34;
//!    the buffers are allocated lazily, so only the touched rows cost memory) and on the same
//!    layout packed at offset 0; every output must agree bit for bit. An offset formed in 32
//!    bits anywhere (gather, append, attention, H2O mass or eviction, R-KV scoring or compaction)
//!    reads or writes another row and breaks the equality.
#![cfg(feature = "emulator")]

mod common;

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::rc::Rc;

use half::{bf16, f16};
use headwise::emu::EmuStore;
use headwise::heavy_hitters::{H2oOptions, H2oWorkspace, evict_by_mass};
use headwise::layout::{LayerLayout, LayoutBuilder, MAX_ROWS, Segment};
use headwise::params::HwLaunch;
use headwise::redundancy::{QueryRing, RkvOptions, RkvTrigger, RkvWorkspace, evict};
use headwise::select::{Budgets, Prompt, SelectOptions, SelectWorkspace, compress, compress_into};
use headwise::store::{Elem, KernelParams, Store};
use headwise::{AttentionOptions, AttentionWorkspace, Error, KvElem, LayerCache, Result};

const SEQS: usize = 32;
const KV_HEADS: usize = 8;
const TOKENS: u32 = 128 * 1024;

// sm_90 launch limits (CUDA C Programming Guide, compute capability 9.0).
const MAX_GRID_X: u32 = i32::MAX as u32;
const MAX_GRID_YZ: u32 = 65535;
const MAX_BLOCK_THREADS: u32 = 1024;
const MAX_BLOCK_Z: u32 = 64;
const MAX_DYN_SMEM: u32 = 227 * 1024;

/// A buffer that is only a length and an address: nothing is allocated.
struct FakeBuf<T> {
    len: usize,
    addr: u64,
    _t: PhantomData<T>,
}

/// A store that records launches instead of running them, so the largest cache can be planned
/// on a machine without 32 GiB to spare. Downloads (the few host reads of small device results)
/// return zeros.
#[derive(Clone, Default)]
struct PlanStore {
    launches: Rc<RefCell<Vec<(String, HwLaunch)>>>,
    next_addr: Rc<Cell<u64>>,
}

impl PlanStore {
    fn buf<T>(&self, len: usize) -> FakeBuf<T> {
        // Distinct, 256-byte aligned fake addresses, as cudaMalloc would give.
        let addr = self.next_addr.get() + 256;
        self.next_addr.set(addr + (len as u64 * size_of::<T>() as u64).next_multiple_of(256));
        FakeBuf { len, addr, _t: PhantomData }
    }
}

impl Store for PlanStore {
    type Buf<T: Elem> = FakeBuf<T>;
    type Pins<'a> = ();

    fn upload<T: Elem>(&self, data: &[T]) -> Result<FakeBuf<T>> {
        Ok(self.buf(data.len()))
    }
    fn zeros<T: Elem>(&self, n: usize) -> Result<FakeBuf<T>> {
        Ok(self.buf(n))
    }
    fn download<T: Elem>(&self, buf: &FakeBuf<T>) -> Result<Vec<T>> {
        assert!(buf.len <= 1 << 24, "a download of {} elements from the plan store", buf.len);
        Ok(vec![T::zeroed(); buf.len])
    }
    fn overwrite<T: Elem>(&self, buf: &mut FakeBuf<T>, data: &[T]) -> Result<()> {
        assert_eq!(buf.len, data.len());
        Ok(())
    }
    fn len<T: Elem>(buf: &FakeBuf<T>) -> usize {
        buf.len
    }
    fn sm_count(&self) -> usize {
        132
    }
    fn check_buf<T: Elem>(&self, _field: &str, _buf: &FakeBuf<T>) -> Result<()> {
        Ok(())
    }
    fn addr<'a, T: Elem>(&'a self, _field: &str, buf: &'a FakeBuf<T>, _pins: &mut ()) -> Result<u64> {
        Ok(buf.addr)
    }
    fn addr_mut<'a, T: Elem>(&'a self, _field: &str, buf: &'a mut FakeBuf<T>, _pins: &mut ()) -> Result<u64> {
        Ok(buf.addr)
    }
    unsafe fn launch<P: KernelParams>(&self, name: &'static str, cfg: &HwLaunch, _params: &P) -> Result<()> {
        self.launches.borrow_mut().push((name.to_string(), *cfg));
        Ok(())
    }
}

fn check_launch(name: &str, c: &HwLaunch) -> std::result::Result<(), String> {
    let threads = u64::from(c.block_x) * u64::from(c.block_y) * u64::from(c.block_z);
    let ok = (1..=MAX_GRID_X).contains(&c.grid_x)
        && (1..=MAX_GRID_YZ).contains(&c.grid_y)
        && (1..=MAX_GRID_YZ).contains(&c.grid_z)
        && c.block_x >= 1
        && c.block_y >= 1
        && (1..=MAX_BLOCK_Z).contains(&c.block_z)
        && threads <= u64::from(MAX_BLOCK_THREADS)
        && c.dyn_smem_bytes <= MAX_DYN_SMEM;
    if ok { Ok(()) } else { Err(format!("{name}: {c:?} exceeds sm_90 launch limits")) }
}

/// Plans every operation on the largest cache at `head_dim` with group size `g`; returns the
/// names of the kernels launched.
fn plan_largest<T: KvElem>(head_dim: usize, g: usize) -> BTreeSet<String> {
    let store = PlanStore::default();
    let segs = SEQS * KV_HEADS;
    let mut b = LayoutBuilder::new(SEQS, KV_HEADS).headroom(64);
    for s in 0..SEQS {
        for h in 0..KV_HEADS {
            b = b.full(s, h, TOKENS);
        }
    }
    let layout = b.build().unwrap();
    let rows = layout.total_rows() as u64;
    assert!(rows <= MAX_ROWS, "the largest cache must fit int32 rows");
    assert!(layout.device_table().iter().all(|&x| x >= 0), "device table entries are int32 and nonnegative");
    if head_dim == 256 {
        // The premise of the emulator check below: element offsets need more than 32 bits.
        let elems = rows * head_dim as u64;
        assert!(elems > u64::from(u32::MAX), "{elems} elements: 32-bit offsets would suffice");
    }
    let mut cache: LayerCache<PlanStore, T> = LayerCache::new(&store, layout, head_dim).unwrap();

    // Decode: append, attention (split across SMs, then merged), query ring.
    let tok = store.zeros::<T>(segs * head_dim).unwrap();
    cache.append(&tok, &tok).unwrap();
    let q = store.zeros::<T>(segs * g * head_dim).unwrap();
    let mut out = store.zeros::<T>(segs * g * head_dim).unwrap();
    let mut lse = store.zeros::<f32>(segs * g).unwrap();
    let mut aws = AttentionWorkspace::new();
    cache.attention(&q, g, &mut out, Some(&mut lse), &mut aws, &AttentionOptions::default()).unwrap();
    // The smallest chunk gives the most splits (and the largest merge).
    let opts = AttentionOptions { chunk_tokens: Some(128), ..Default::default() };
    cache.attention(&q, g, &mut out, Some(&mut lse), &mut aws, &opts).unwrap();
    // H2O's mass kernel over every 128k-token segment (its own grid), split and not.
    let mut mass = store.zeros::<f32>(rows as usize).unwrap();
    for opts in [AttentionOptions::default(), opts] {
        cache.attention_with_mass(&q, g, &mut out, None, &mut aws, &opts, &mut mass).unwrap();
    }

    // R-KV: every segment over budget + buffer is compacted.
    let mut ring: QueryRing<PlanStore, T> = QueryRing::new(&store, segs * g, 8, head_dim).unwrap();
    ring.push(&q).unwrap();
    let compacted =
        evict(&mut cache, &ring, g, &RkvOptions::new(2048), RkvTrigger::Threshold, &mut RkvWorkspace::new())
            .unwrap();
    assert!(compacted.iter().all(|&c| c));

    // Regrow: the relayout copy over every row.
    cache.regrow(64).unwrap();

    // H2O: every segment (2048 tokens after R-KV) evicted by mass to 1024.
    let mut mass = store.zeros::<f32>(cache.layout().total_rows()).unwrap();
    let h2o = H2oOptions { budget: 1024, recent: 64 };
    let compacted = evict_by_mass(&mut cache, &mut mass, &h2o, &mut H2oWorkspace::new()).unwrap();
    assert!(compacted.iter().all(|&c| c));

    // Prefill selection over a 128k-token prompt: SnapKV-style per-row budgets and AdaKV, per
    // KV head and per query head.
    let kv = store.zeros::<T>(segs * TOKENS as usize * head_dim).unwrap();
    let window = 32;
    let queries = store.zeros::<T>(segs * g * window * head_dim).unwrap();
    let prompt = Prompt {
        k: &kv,
        v: &kv,
        queries: &queries,
        batch: SEQS,
        kv_heads: KV_HEADS,
        group_size: g,
        q_len: TOKENS as usize,
        head_dim,
        packing: Default::default(),
    };
    let mut sws = SelectWorkspace::new();
    for granularity in [headwise::select::Granularity::KvHead, headwise::select::Granularity::QueryHead] {
        let opts = SelectOptions { window, granularity, ..Default::default() };
        let rows = if granularity == headwise::select::Granularity::KvHead { segs } else { segs * g };
        let budgets = vec![2048u32; rows];
        compress(&store, &prompt, Budgets::PerRow(&budgets), &opts, &mut sws).unwrap();
        let mut dest = LayerCache::new(
            &store,
            LayoutBuilder::new(SEQS, rows / SEQS).headroom(2048).build().unwrap(),
            head_dim,
        )
        .unwrap();
        compress_into(&mut dest, &prompt, Budgets::PerRow(&budgets), &opts, &mut sws).unwrap();
        compress(&store, &prompt, Budgets::AdaKv { base: 2048, floor_alpha: 0.2 }, &opts, &mut sws).unwrap();
    }

    let launches = store.launches.borrow();
    let bad: Vec<String> = launches.iter().filter_map(|(n, c)| check_launch(n, c).err()).collect();
    assert!(bad.is_empty(), "launches past hardware limits:\n{}", bad.join("\n"));
    launches.iter().map(|(n, _)| n.clone()).collect()
}

#[test]
fn largest_cache_launches_fit_hardware_limits() {
    let mut seen = BTreeSet::new();
    for d in [64, 128, 256] {
        for g in [1, 8, 16] {
            seen.extend(plan_largest::<f16>(d, g));
        }
    }
    seen.extend(plan_largest::<bf16>(256, 16));
    // Every kernel family was planned at this size (a family that silently dropped out would
    // leave its grid unchecked).
    let families = [
        "hw_append_",
        "hw_attention_f16_",
        "hw_attention_bf16_",
        "hw_attention_merge_",
        "hw_query_push_",
        "hw_rkv_norms_",
        "hw_rkv_importance_",
        "hw_rkv_similarity_",
        "hw_rkv_select_",
        "hw_relayout_",
        "hw_select_",
        "hw_h2o_mass_",
        "hw_h2o_evict_",
    ];
    for f in families {
        assert!(seen.iter().any(|n| n.starts_with(f)), "no {f}* launch planned; launched: {seen:?}");
    }
    println!("{} kernels planned at 32 x 8 x 128k tokens: {seen:?}", seen.len());
}

/// Runs gather, append, attention (with H2O mass), the H2O eviction and R-KV on `layout` (two
/// segments of one sequence, one per KV head) and returns every output the kernels wrote, in
/// order.
fn run_ops<T: KvElem>(layout: LayerLayout, seed: u64) -> std::result::Result<Vec<Vec<u16>>, Error> {
    const D: usize = 256;
    const G: usize = 4;
    const Q_LEN: usize = 400;
    const WINDOW: usize = 32;
    let store = EmuStore;
    let bits = |buf: &Vec<T>| -> Vec<u16> { bytemuck::cast_slice::<T, u16>(buf).to_vec() };
    let mut outs = Vec::new();

    let k = store.upload(&common::values::<T>(seed, 2 * Q_LEN * D, 1.0))?;
    let v = store.upload(&common::values::<T>(seed + 1, 2 * Q_LEN * D, 1.0))?;
    let qs = store.upload(&common::values::<T>(seed + 2, 2 * G * WINDOW * D, 1.0))?;
    let prompt = Prompt {
        k: &k,
        v: &v,
        queries: &qs,
        batch: 1,
        kv_heads: 2,
        group_size: G,
        q_len: Q_LEN,
        head_dim: D,
        packing: Default::default(),
    };
    let mut cache: LayerCache<EmuStore, T> = LayerCache::new(&store, layout, D)?;
    let opts = SelectOptions { window: WINDOW, ..Default::default() };
    compress_into(&mut cache, &prompt, Budgets::PerRow(&[300, 240]), &opts, &mut SelectWorkspace::new())?;

    let mut ring = QueryRing::new(&store, 2 * G, 8, D)?;
    let mut aws = AttentionWorkspace::new();
    // H2O's mass, one f32 per row of the (far: 2^25-row) cache; compared by token below.
    let mut mass = store.zeros::<f32>(cache.layout().total_rows())?;
    let token_mass = |cache: &LayerCache<EmuStore, T>, mass: &EmuBufT<f32>| -> Result<Vec<u16>> {
        let m = store.download(mass)?;
        let rows = cache.layout().segments().iter().flat_map(|s| (0..s.len).map(|i| s.row(i) as usize));
        Ok(rows.flat_map(|r| [(m[r].to_bits() >> 16) as u16, m[r].to_bits() as u16]).collect())
    };
    let mut attend = |cache: &LayerCache<EmuStore, T>,
                      q: &EmuBufT<T>,
                      mass: Option<&mut EmuBufT<f32>>,
                      outs: &mut Vec<Vec<u16>>|
     -> Result<()> {
        let mut out = store.zeros::<T>(2 * G * D)?;
        let mut lse = store.zeros::<f32>(2 * G)?;
        // chunk 64: split into several blocks, so the merge kernel runs too.
        let opts = AttentionOptions { chunk_tokens: Some(64), ..Default::default() };
        match mass {
            Some(m) => cache.attention_with_mass(q, G, &mut out, Some(&mut lse), &mut aws, &opts, m)?,
            None => cache.attention(q, G, &mut out, Some(&mut lse), &mut aws, &opts)?,
        }
        let o = store.download(&out)?;
        assert!(o.iter().any(|x| x.to_f32() != 0.0), "attention wrote only zeros");
        outs.push(bits(&o));
        outs.push(store.download(&lse)?.iter().map(|x| (x.to_bits() >> 16) as u16).collect());
        outs.push(store.download(&lse)?.iter().map(|x| x.to_bits() as u16).collect());
        Ok(())
    };
    for step in 0..3u64 {
        let kn = store.upload(&common::values::<T>(seed + 10 + step, 2 * D, 1.0))?;
        let vn = store.upload(&common::values::<T>(seed + 20 + step, 2 * D, 1.0))?;
        cache.append(&kn, &vn)?;
        let q = store.upload(&common::values::<T>(seed + 30 + step, 2 * G * D, 1.0))?;
        ring.push(&q)?;
        attend(&cache, &q, Some(&mut mass), &mut outs)?;
    }
    outs.push(token_mass(&cache, &mass)?);
    let h2o = H2oOptions { budget: 200, recent: 32 };
    assert_eq!(evict_by_mass(&mut cache, &mut mass, &h2o, &mut H2oWorkspace::new())?, vec![true, true]);
    outs.push(token_mass(&cache, &mass)?);
    let mut rws = RkvWorkspace::new();
    let compacted =
        evict(&mut cache, &ring, G, &RkvOptions::new(128), RkvTrigger::Forced(&[true, true]), &mut rws)?;
    assert_eq!(compacted, vec![true, true]);
    for (_, kept) in rws.kept(&store)? {
        outs.push(kept.iter().map(|&x| x as u16).collect());
    }
    let q = store.upload(&common::values::<T>(seed + 40, 2 * G * D, 1.0))?;
    attend(&cache, &q, None, &mut outs)?;
    Ok(outs)
}

type EmuBufT<T> = headwise::emu::EmuBuf<T>;

fn far_and_near<T: KvElem>() {
    // Segment 1 at the last rows of the largest cache's 2^25-row buffer: its rows start at
    // byte offset (2^25 - 1024) * 256 * 2, about 2^34.
    let total: u64 = (SEQS * KV_HEADS) as u64 * u64::from(TOKENS);
    let far_off = (total - 1024) as u32;
    let far = LayerLayout::new(1, 2, total, vec![Segment::full(0, 512, 0), Segment::full(far_off, 1024, 0)])
        .unwrap();
    let near =
        LayerLayout::new(1, 2, 1536, vec![Segment::full(0, 512, 0), Segment::full(512, 1024, 0)]).unwrap();
    assert!(u64::from(far_off) * 256 * 2 > 1 << 33, "the far segment must sit past 32-bit byte offsets");
    let a = run_ops::<T>(far, 7).unwrap();
    let b = run_ops::<T>(near, 7).unwrap();
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            x == y,
            "far and near layouts disagree at output {i} (gather, append, attention + mass, H2O, R-KV in order)"
        );
    }
}

#[test]
fn kernels_address_rows_past_32_bit_offsets() {
    far_and_near::<f16>();
    far_and_near::<bf16>();
}
