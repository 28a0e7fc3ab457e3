//! The C ABI's GPU entry points on a real GPU (`--features capi,gpu-tests`; with the features on
//! and no GPU they fail, so a GPU run cannot pass by skipping). A prefill-then-decode loop runs
//! twice over the same inputs: through the C functions on raw device pointers, and through the
//! Rust API. Same kernels on the same device, so every buffer, length and output must agree bit
//! for bit: what is checked is the wrapping (pointers, sizes, options, dtype dispatch, layout
//! bookkeeping), not the kernels, which tests/gpu.rs covers.
#![cfg(all(feature = "capi", feature = "gpu-tests"))]

mod common;

use cudarc::driver::{CudaSlice, DevicePtr};
use half::bf16;
use headwise::capi::*;
use headwise::redundancy::{self, QueryRing, RkvOptions, RkvTrigger, RkvWorkspace};
use headwise::select::{self, Budgets, Prompt, SelectOptions, SelectWorkspace};
use headwise::{AttentionOptions, AttentionWorkspace, GpuBuf, GpuStore, LayerCache, LayerLayout, Store};
use std::ffi::c_void;
use std::ptr::null_mut;

const D: usize = 64;
const G: usize = 2;
const KV_HEADS: usize = 2;
const Q_LEN: usize = 64;
const WINDOW: usize = 8;
const STEPS: usize = 16;

fn ok(code: i32) {
    if code != HEADWISE_OK {
        let mut buf = vec![0u8; 1024];
        // SAFETY: buf holds buf.len() writable bytes.
        let n = unsafe { headwise_last_error_message(buf.as_mut_ptr().cast(), buf.len()) };
        panic!("status {code}: {}", String::from_utf8_lossy(&buf[..n.min(1023)]));
    }
}

/// The device address of a cudarc allocation. Every use below is on the store's one stream, so
/// the ordering guard cudarc returns is not needed beyond this call.
fn addr<T>(store: &GpuStore, s: &CudaSlice<T>) -> *mut c_void {
    let (p, _guard) = s.device_ptr(store.stream());
    p as usize as *mut c_void
}

/// `len` elements at `base + offset` elements, as a borrowed buffer for the Rust path.
fn view<T: headwise::store::Elem>(base: *mut c_void, offset: usize, len: usize) -> GpuBuf<T> {
    // SAFETY: every caller passes a range inside an allocation that outlives the view.
    unsafe { GpuBuf::borrowed(base as u64 + (offset * size_of::<T>()) as u64, len) }
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

#[test]
fn c_abi_decode_loop_matches_the_rust_api() {
    let store = GpuStore::new(0).unwrap_or_else(|e| panic!("gpu-tests enabled but no usable GPU: {e}"));
    let s = store.stream();
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

    // Engine memory: both paths' caches, and the shared read-only inputs.
    let zeros = || s.alloc_zeros::<bf16>(elems).unwrap();
    let (k_c, v_c, k_r, v_r) = (zeros(), zeros(), zeros(), zeros());
    let kv_len = KV_HEADS * Q_LEN * D;
    let prompt_k = s.clone_htod(&common::values::<bf16>(1, kv_len, 1.0)).unwrap();
    let prompt_v = s.clone_htod(&common::values::<bf16>(2, kv_len, 1.0)).unwrap();
    let queries = s.clone_htod(&common::values::<bf16>(3, heads * WINDOW * D, 1.0)).unwrap();
    let new_k = s.clone_htod(&common::values::<bf16>(4, STEPS * segments * D, 1.0)).unwrap();
    let new_v = s.clone_htod(&common::values::<bf16>(5, STEPS * segments * D, 1.0)).unwrap();
    let step_q = s.clone_htod(&common::values::<bf16>(6, STEPS * heads * D, 1.0)).unwrap();
    let (out_c, out_r) =
        (s.alloc_zeros::<bf16>(heads * D).unwrap(), s.alloc_zeros::<bf16>(heads * D).unwrap());
    let (lse_c, lse_r) = (s.alloc_zeros::<f32>(heads).unwrap(), s.alloc_zeros::<f32>(heads).unwrap());

    // The C path.
    let mut gpu: *mut HeadwiseGpu = null_mut();
    let mut cache: *mut HeadwiseCache = null_mut();
    let mut ring: *mut HeadwiseQueryRing = null_mut();
    let mut opts = std::mem::MaybeUninit::<HeadwiseSelectOptions>::uninit();
    let mut rkv = std::mem::MaybeUninit::<HeadwiseRkvOptions>::uninit();
    let mut compacted_c = [9u8; KV_HEADS];
    // SAFETY: the store's own stream (primary context of device 0); every device pointer is a
    // live allocation above of the size the function documents; out-pointers to locals.
    unsafe {
        ok(headwise_gpu_create(0, s.cu_stream().cast(), &mut gpu));
        ok(headwise_cache_create(
            gpu,
            layout_c,
            HEADWISE_DTYPE_BF16,
            D,
            addr(&store, &k_c),
            addr(&store, &v_c),
            &mut cache,
        ));
        ok(headwise_select_options_default(opts.as_mut_ptr()));
        let mut opts = opts.assume_init();
        opts.window = WINDOW as u32;
        let prompt = HeadwisePrompt {
            k: addr(&store, &prompt_k),
            v: addr(&store, &prompt_v),
            queries: addr(&store, &queries),
            batch: 1,
            kv_heads: KV_HEADS,
            group_size: G,
            q_len: Q_LEN,
        };
        ok(headwise_cache_compress_into(cache, &prompt, &opts, budgets.as_ptr(), budgets.len()));
        ok(headwise_query_ring_create(gpu, HEADWISE_DTYPE_BF16, heads, 8, D, &mut ring));
        for step in 0..STEPS {
            let off = |base: *mut c_void, n: usize| base.cast::<bf16>().add(step * n).cast::<c_void>();
            ok(headwise_cache_append(
                cache,
                off(addr(&store, &new_k), segments * D),
                off(addr(&store, &new_v), segments * D),
            ));
            let q = off(addr(&store, &step_q), heads * D);
            ok(headwise_cache_attention(
                cache,
                q,
                G,
                addr(&store, &out_c),
                addr(&store, &lse_c).cast(),
                0.0,
                0,
            ));
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
        let mut f16_ring: *mut HeadwiseQueryRing = null_mut();
        ok(headwise_query_ring_create(gpu, HEADWISE_DTYPE_F16, heads, 8, D, &mut f16_ring));
        assert_eq!(
            headwise_cache_evict(cache, f16_ring, G, rkv.as_ptr(), forced.as_ptr(), 2, null_mut(), 0),
            HEADWISE_ERROR_INVALID_ARGUMENT
        );
        ok(headwise_query_ring_free(f16_ring));
        ok(headwise_gpu_synchronize(gpu));
    }

    // The Rust path over the same inputs.
    let layout =
        headwise::LayoutBuilder::new(1, KV_HEADS).headroom(24).full(0, 0, 40).full(0, 1, 24).build().unwrap();
    assert_eq!(rust_layout(&layout), layout_of(layout_c));
    let mut cache_r = LayerCache::<_, bf16>::from_parts(
        &store,
        layout,
        D,
        view(addr(&store, &k_r), 0, elems),
        view(addr(&store, &v_r), 0, elems),
    )
    .unwrap();
    let sel = SelectOptions { window: WINDOW, ..SelectOptions::default() };
    let (pk, pv, pq) = (
        view::<bf16>(addr(&store, &prompt_k), 0, kv_len),
        view::<bf16>(addr(&store, &prompt_v), 0, kv_len),
        view::<bf16>(addr(&store, &queries), 0, heads * WINDOW * D),
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
    };
    select::compress_into(
        &mut cache_r,
        &prompt,
        Budgets::PerRow(&budgets),
        &sel,
        &mut SelectWorkspace::new(),
    )
    .unwrap();
    let mut ring_r = QueryRing::<_, bf16>::new(&store, heads, 8, D).unwrap();
    let mut ws = AttentionWorkspace::new();
    let mut out = view::<bf16>(addr(&store, &out_r), 0, heads * D);
    let mut lse = view::<f32>(addr(&store, &lse_r), 0, heads);
    for step in 0..STEPS {
        let k = view::<bf16>(addr(&store, &new_k), step * segments * D, segments * D);
        let v = view::<bf16>(addr(&store, &new_v), step * segments * D, segments * D);
        let q = view::<bf16>(addr(&store, &step_q), step * heads * D, heads * D);
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
    store.synchronize().unwrap();

    // Bit for bit.
    assert_eq!(compacted_c.map(|c| c == 1), <[bool; KV_HEADS]>::try_from(compacted_r).unwrap());
    assert_eq!(compacted_c, [1; KV_HEADS]);
    let bits = |b: &CudaSlice<bf16>| s.clone_dtoh(b).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&k_c), bits(&k_r), "K caches differ");
    assert_eq!(bits(&v_c), bits(&v_r), "V caches differ");
    assert_eq!(bits(&out_c), bits(&out_r), "attention outputs differ");
    let lse_bits =
        |b: &CudaSlice<f32>| s.clone_dtoh(b).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(lse_bits(&lse_c), lse_bits(&lse_r), "LSEs differ");
    let mut snapshot: *mut HeadwiseLayout = null_mut();
    // SAFETY: live handles; out-pointer to a local.
    ok(unsafe { headwise_cache_layout(cache, &mut snapshot) });
    assert_eq!(layout_of(snapshot), rust_layout(cache_r.layout()));
    assert!(layout_of(snapshot).iter().all(|seg| seg.2 == 20));

    // Relayout into larger engine buffers, then keep decoding on a new cache over them.
    let mut grown: *mut HeadwiseLayout = null_mut();
    let mut grown_rows = 0u64;
    // SAFETY: live handles; out-pointers to locals.
    unsafe {
        ok(headwise_layout_regrown(snapshot, 32, &mut grown));
        ok(headwise_layout_total_rows(grown, &mut grown_rows));
    }
    let grown_elems = grown_rows as usize * D;
    let (k2, v2) = (s.alloc_zeros::<bf16>(grown_elems).unwrap(), s.alloc_zeros::<bf16>(grown_elems).unwrap());
    let mut cache2: *mut HeadwiseCache = null_mut();
    // SAFETY: k2/v2 hold grown_rows * D elements; live handles.
    unsafe {
        ok(headwise_cache_relayout_into(cache, grown, addr(&store, &k2), addr(&store, &v2)));
        ok(headwise_cache_create(
            gpu,
            grown,
            HEADWISE_DTYPE_BF16,
            D,
            addr(&store, &k2),
            addr(&store, &v2),
            &mut cache2,
        ));
        ok(headwise_cache_append(cache2, addr(&store, &new_k), addr(&store, &new_v)));
        ok(headwise_gpu_synchronize(gpu));
    }
    let grown_layout = cache_r.layout().regrown(32).unwrap();
    let (mut k2r, mut v2r) =
        (store.zeros::<bf16>(grown_elems).unwrap(), store.zeros::<bf16>(grown_elems).unwrap());
    cache_r.relayout_into(&grown_layout, &mut k2r, &mut v2r).unwrap();
    let mut cache2r = LayerCache::from_parts(&store, grown_layout, D, k2r, v2r).unwrap();
    cache2r
        .append(&view(addr(&store, &new_k), 0, segments * D), &view(addr(&store, &new_v), 0, segments * D))
        .unwrap();
    let (_, k2r, v2r) = cache2r.into_parts();
    let got_k: Vec<u16> = bits(&k2);
    let want_k: Vec<u16> = store.download(&k2r).unwrap().iter().map(|x| x.to_bits()).collect();
    assert_eq!(got_k, want_k, "relayout + append: K differs");
    let want_v: Vec<u16> = store.download(&v2r).unwrap().iter().map(|x| x.to_bits()).collect();
    assert_eq!(bits(&v2), want_v, "relayout + append: V differs");

    // SAFETY: every handle is live and freed once; the caches go before the stream they use.
    unsafe {
        for code in [
            headwise_cache_free(cache2),
            headwise_cache_free(cache),
            headwise_query_ring_free(ring),
            headwise_layout_free(grown),
            headwise_layout_free(snapshot),
            headwise_layout_free(layout_c),
            headwise_gpu_free(gpu),
        ] {
            ok(code);
        }
    }
}
