//! The C ABI's decode loop, generic over the store: a prefill-then-decode loop runs twice over
//! the same inputs, through the C functions on raw pointers and through the Rust API. Same
//! kernels on the same store, so every buffer, length and output must agree bit for bit: what
//! is checked is the wrapping (pointers, sizes, options, dtype and store dispatch, layout
//! bookkeeping), not the kernels, which their own suites cover. tests/capi_emu.rs runs it on the
//! emulator, tests/capi_gpu.rs on a GPU.

use super::values;
use headwise::capi::*;
use headwise::redundancy::{self, QueryRing, RkvOptions, RkvTrigger, RkvWorkspace};
use headwise::select::{self, Budgets, Prompt, SelectOptions, SelectWorkspace};
use headwise::store::Elem;
use headwise::{AttentionOptions, AttentionWorkspace, KvElem, LayerCache, LayerLayout, Store};
use std::ffi::c_void;
use std::ptr::null_mut;

const D: usize = 64;
const G: usize = 2;
const KV_HEADS: usize = 2;
const Q_LEN: usize = 64;
const WINDOW: usize = 8;
const STEPS: usize = 16;

/// What the loop needs of a store beyond [`Store`]: the C handle over it, and raw addresses of
/// its buffers as the C ABI takes them.
pub trait CStoreUnderTest: Store {
    /// A C store handle over the same memory and (on a GPU) the same stream.
    fn c_handle(&self) -> *mut HeadwiseStore;
    /// `len` elements at `ptr`, borrowed, for the Rust path.
    ///
    /// # Safety
    /// `ptr` must lie in a live buffer of this store holding `len` elements from there.
    unsafe fn view<T: Elem>(ptr: *mut c_void, len: usize) -> Self::Buf<T>;
}

pub fn ok(code: i32) {
    if code != HEADWISE_OK {
        let mut buf = vec![0u8; 1024];
        // SAFETY: buf holds buf.len() writable bytes.
        let n = unsafe { headwise_last_error_message(buf.as_mut_ptr().cast(), buf.len()) };
        panic!("status {code}: {}", String::from_utf8_lossy(&buf[..n.min(1023)]));
    }
}

/// The raw address of a store buffer, as the C ABI takes it. Every use is ordered on the
/// store's one stream, so no ordering guard is needed beyond this call.
fn addr<S: Store, T: Elem>(store: &S, b: &S::Buf<T>) -> *mut c_void {
    let mut pins = Default::default();
    store.addr("buf", b, &mut pins).expect("addressable") as usize as *mut c_void
}

/// `len` elements at `base + offset` elements.
fn view<S: CStoreUnderTest, T: Elem>(base: *mut c_void, offset: usize, len: usize) -> S::Buf<T> {
    // SAFETY: every caller passes a range inside a buffer that outlives the view.
    unsafe { S::view(base.cast::<T>().add(offset).cast(), len) }
}

fn layout_of(layout: *const HeadwiseLayout) -> Vec<(u32, u32, u32, u32, i32)> {
    let mut n = 0usize;
    // SAFETY: a live layout handle; out-pointers to locals and to vectors of n elements.
    unsafe {
        ok(headwise_layout_num_segments(layout, &mut n));
        let (mut o, mut c, mut l, mut r, mut m) =
            (vec![0; n], vec![0; n], vec![0; n], vec![0; n], vec![0; n]);
        ok(headwise_layout_segments(
            layout,
            n,
            o.as_mut_ptr(),
            c.as_mut_ptr(),
            l.as_mut_ptr(),
            r.as_mut_ptr(),
            m.as_mut_ptr(),
            null_mut(),
            null_mut(),
        ));
        (0..n).map(|i| (o[i], c[i], l[i], r[i], m[i])).collect()
    }
}

fn rust_layout(layout: &LayerLayout) -> Vec<(u32, u32, u32, u32, i32)> {
    layout
        .segments()
        .iter()
        .map(|s| {
            let mode = match s.mode {
                headwise::SegmentMode::Full => HEADWISE_MODE_FULL,
                headwise::SegmentMode::Streaming { .. } => HEADWISE_MODE_STREAMING,
            };
            (s.offset, s.capacity, s.len, s.ring_head, mode)
        })
        .collect()
}

fn bits<S: Store, T: Elem>(store: &S, b: &S::Buf<T>) -> Vec<u8> {
    bytemuck::cast_slice(&store.download(b).unwrap()).to_vec()
}

/// The loop in dtype `T` (C code `dtype`, `other_dtype` the other one).
pub fn decode_loop_matches_the_rust_api<S: CStoreUnderTest, T: KvElem>(
    store: &S,
    dtype: i32,
    other_dtype: i32,
) {
    let segments = KV_HEADS;
    let heads = segments * G;
    let budgets = [40u32, 24];

    // One layout for both paths: Full segments of budget + 24 rows (room for the decode steps).
    let mut layout_c: *mut HeadwiseLayout = null_mut();
    // SAFETY: arrays of batch * kv_heads elements; out-pointer to a local.
    ok(unsafe {
        headwise_layout_pack(
            1,
            KV_HEADS,
            24,
            std::ptr::null(),
            budgets.as_ptr(),
            null_mut(),
            null_mut(),
            &mut layout_c,
        )
    });
    let mut total_rows = 0u64;
    // SAFETY: live handle, out-pointer to a local.
    ok(unsafe { headwise_layout_total_rows(layout_c, &mut total_rows) });
    let elems = total_rows as usize * D;

    // Caller memory: both paths' caches, and the shared read-only inputs.
    let zeros = |n: usize| store.zeros::<T>(n).unwrap();
    let (k_c, v_c, k_r, v_r) = (zeros(elems), zeros(elems), zeros(elems), zeros(elems));
    let kv_len = KV_HEADS * Q_LEN * D;
    let up = |seed: u64, n: usize| store.upload(&values::<T>(seed, n, 1.0)).unwrap();
    let (prompt_k, prompt_v, queries) = (up(1, kv_len), up(2, kv_len), up(3, heads * WINDOW * D));
    let (new_k, new_v, step_q) =
        (up(4, STEPS * segments * D), up(5, STEPS * segments * D), up(6, STEPS * heads * D));
    let (out_c, out_r) = (zeros(heads * D), zeros(heads * D));
    let (lse_c, lse_r) = (store.zeros::<f32>(heads).unwrap(), store.zeros::<f32>(heads).unwrap());
    let a = |b: &S::Buf<T>| addr(store, b);

    // The C path.
    let c_store = store.c_handle();
    let mut cache: *mut HeadwiseCache = null_mut();
    let mut ring: *mut HeadwiseQueryRing = null_mut();
    let mut opts = std::mem::MaybeUninit::<HeadwiseSelectOptions>::uninit();
    let mut rkv = std::mem::MaybeUninit::<HeadwiseRkvOptions>::uninit();
    let mut compacted_c = [9u8; KV_HEADS];
    // SAFETY: every pointer is a live buffer above of the size the function documents;
    // out-pointers to locals.
    unsafe {
        ok(headwise_cache_create(c_store, layout_c, dtype, D, a(&k_c), a(&v_c), &mut cache));
        ok(headwise_select_options_default(opts.as_mut_ptr()));
        let mut opts = opts.assume_init();
        opts.window = WINDOW as u32;
        let prompt = HeadwisePrompt {
            k: a(&prompt_k),
            v: a(&prompt_v),
            queries: a(&queries),
            batch: 1,
            kv_heads: KV_HEADS,
            group_size: G,
            q_len: Q_LEN,
            cu_seqlens: std::ptr::null(),
        };
        ok(headwise_cache_compress_into(cache, &prompt, &opts, budgets.as_ptr(), budgets.len()));
        ok(headwise_query_ring_create(c_store, dtype, heads, 8, D, &mut ring));
        for step in 0..STEPS {
            let off = |base: *mut c_void, n: usize| base.cast::<T>().add(step * n).cast::<c_void>();
            ok(headwise_cache_append(cache, off(a(&new_k), segments * D), off(a(&new_v), segments * D)));
            let q = off(a(&step_q), heads * D);
            ok(headwise_cache_attention(cache, q, G, a(&out_c), addr(store, &lse_c).cast(), 0.0, 0));
            ok(headwise_query_ring_push(ring, q));
        }
        ok(headwise_rkv_options_default(20, rkv.as_mut_ptr()));
        let forced = [1u8; KV_HEADS];
        ok(headwise_cache_evict(
            cache,
            ring,
            G,
            rkv.as_ptr(),
            forced.as_ptr(),
            forced.len(),
            compacted_c.as_mut_ptr(),
            compacted_c.len(),
        ));
        // A ring of another dtype is refused before any launch.
        let mut other_ring: *mut HeadwiseQueryRing = null_mut();
        ok(headwise_query_ring_create(c_store, other_dtype, heads, 8, D, &mut other_ring));
        assert_eq!(
            headwise_cache_evict(cache, other_ring, G, rkv.as_ptr(), forced.as_ptr(), 2, null_mut(), 0),
            HEADWISE_ERROR_INVALID_ARGUMENT
        );
        ok(headwise_query_ring_free(other_ring));
        ok(headwise_store_synchronize(c_store));
    }

    // The Rust path over the same inputs.
    let layout =
        headwise::LayoutBuilder::new(1, KV_HEADS).headroom(24).full(0, 0, 40).full(0, 1, 24).build().unwrap();
    assert_eq!(rust_layout(&layout), layout_of(layout_c));
    let mut cache_r = LayerCache::<S, T>::from_parts(
        store,
        layout,
        D,
        view::<S, T>(a(&k_r), 0, elems),
        view::<S, T>(a(&v_r), 0, elems),
    )
    .unwrap();
    let sel = SelectOptions { window: WINDOW, ..SelectOptions::default() };
    let (pk, pv, pq) = (
        view::<S, T>(a(&prompt_k), 0, kv_len),
        view::<S, T>(a(&prompt_v), 0, kv_len),
        view::<S, T>(a(&queries), 0, heads * WINDOW * D),
    );
    let prompt = Prompt {
        k: &pk,
        v: &pv,
        queries: &pq,
        batch: 1,
        kv_heads: KV_HEADS,
        group_size: G,
        q_len: Q_LEN,
        head_dim: D,
        packing: Default::default(),
    };
    select::compress_into(
        &mut cache_r,
        &prompt,
        Budgets::PerRow(&budgets),
        &sel,
        &mut SelectWorkspace::new(),
    )
    .unwrap();
    let mut ring_r = QueryRing::<S, T>::new(store, heads, 8, D).unwrap();
    let mut ws = AttentionWorkspace::new();
    let mut out = view::<S, T>(a(&out_r), 0, heads * D);
    let mut lse = view::<S, f32>(addr(store, &lse_r), 0, heads);
    for step in 0..STEPS {
        let k = view::<S, T>(a(&new_k), step * segments * D, segments * D);
        let v = view::<S, T>(a(&new_v), step * segments * D, segments * D);
        let q = view::<S, T>(a(&step_q), step * heads * D, heads * D);
        cache_r.append(&k, &v).unwrap();
        cache_r.attention(&q, G, &mut out, Some(&mut lse), &mut ws, &AttentionOptions::default()).unwrap();
        ring_r.push(&q).unwrap();
    }
    let compacted_r = redundancy::evict(
        &mut cache_r,
        &ring_r,
        G,
        &RkvOptions::new(20),
        RkvTrigger::Forced(&[true; KV_HEADS]),
        &mut RkvWorkspace::new(),
    )
    .unwrap();

    // Bit for bit.
    assert_eq!(compacted_c.map(|c| c == 1), <[bool; KV_HEADS]>::try_from(compacted_r).unwrap());
    assert_eq!(compacted_c, [1; KV_HEADS]);
    assert_eq!(bits(store, &k_c), bits(store, &k_r), "K caches differ");
    assert_eq!(bits(store, &v_c), bits(store, &v_r), "V caches differ");
    assert_eq!(bits(store, &out_c), bits(store, &out_r), "attention outputs differ");
    assert!(bits(store, &out_c).iter().any(|&b| b != 0), "the kernels ran: outputs are not all zero");
    assert_eq!(bits(store, &lse_c), bits(store, &lse_r), "LSEs differ");
    let mut snapshot: *mut HeadwiseLayout = null_mut();
    // SAFETY: live handles; out-pointer to a local.
    ok(unsafe { headwise_cache_layout(cache, &mut snapshot) });
    assert_eq!(layout_of(snapshot), rust_layout(cache_r.layout()));
    assert!(layout_of(snapshot).iter().all(|seg| seg.2 == 20));

    // Relayout into larger buffers, then keep decoding on a new cache over them.
    let mut grown: *mut HeadwiseLayout = null_mut();
    let mut grown_rows = 0u64;
    // SAFETY: live handles; out-pointers to locals.
    unsafe {
        ok(headwise_layout_regrown(snapshot, 32, &mut grown));
        ok(headwise_layout_total_rows(grown, &mut grown_rows));
    }
    let grown_elems = grown_rows as usize * D;
    let (k2, v2) = (zeros(grown_elems), zeros(grown_elems));
    let mut cache2: *mut HeadwiseCache = null_mut();
    // SAFETY: k2/v2 hold grown_rows * D elements; live handles.
    unsafe {
        ok(headwise_cache_relayout_into(cache, grown, a(&k2), a(&v2)));
        ok(headwise_cache_create(c_store, grown, dtype, D, a(&k2), a(&v2), &mut cache2));
        ok(headwise_cache_append(cache2, a(&new_k), a(&new_v)));
        ok(headwise_store_synchronize(c_store));
    }
    let grown_layout = cache_r.layout().regrown(32).unwrap();
    let (mut k2r, mut v2r) = (zeros(grown_elems), zeros(grown_elems));
    cache_r.relayout_into(&grown_layout, &mut k2r, &mut v2r).unwrap();
    let mut cache2r = LayerCache::<S, T>::from_parts(store, grown_layout, D, k2r, v2r).unwrap();
    cache2r
        .append(&view::<S, T>(a(&new_k), 0, segments * D), &view::<S, T>(a(&new_v), 0, segments * D))
        .unwrap();
    let (_, k2r, v2r) = cache2r.into_parts();
    assert_eq!(bits(store, &k2), bits(store, &k2r), "relayout + append: K differs");
    assert_eq!(bits(store, &v2), bits(store, &v2r), "relayout + append: V differs");

    // SAFETY: every handle is live and freed once; the caches go before the store they use.
    unsafe {
        for code in [
            headwise_cache_free(cache2),
            headwise_cache_free(cache),
            headwise_query_ring_free(ring),
            headwise_layout_free(grown),
            headwise_layout_free(snapshot),
            headwise_layout_free(layout_c),
            headwise_store_free(c_store),
        ] {
            ok(code);
        }
    }
}
