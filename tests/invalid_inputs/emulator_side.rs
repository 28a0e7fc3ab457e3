//! The C ABI's operations on live emulator handles (`headwise_emulator_create`): the faults only
//! a C caller can make (NULL or misaligned memory, unknown codes, lengths that disagree, a ring of
//! another dtype) mixed with the numeric faults the Rust API refuses, whose outcome must be the
//! Rust call's on a mirror cache with the same layout. Part of tests/invalid_inputs.rs (`mod c`).

use super::*;
use std::ffi::c_void;

const D: usize = 64;
/// Query heads per KV head at most in these cases (buffers are sized for it).
const MAX_G: usize = 20;

/// 16-byte aligned host memory the C calls take pointers into (16 spare bytes at the end).
struct HostMem {
    _mem: Vec<u128>,
    ptr: *mut c_void,
}

impl HostMem {
    fn new(bytes: usize) -> HostMem {
        let mut mem = vec![0u128; bytes.div_ceil(16) + 1];
        // Taken once: the pointer keeps write provenance however often it is handed out.
        let ptr = mem.as_mut_ptr().cast();
        HostMem { _mem: mem, ptr }
    }
    fn ptr(&self) -> *mut c_void {
        self.ptr
    }
}

/// A pointer fault: 0 none, 1 NULL, 2 two bytes off (aligned for 16-bit elements, not for the
/// kernels' 16-byte rows), 3 one byte off (not even element-aligned).
fn fault_ptr(p: *mut c_void, fault: u8) -> *mut c_void {
    match fault {
        1 => null_mut(),
        // wrapping: never dereferenced when refused, and inside the allocation (16 spare bytes).
        2 => p.wrapping_byte_add(2),
        3 => p.wrapping_byte_add(1),
        _ => p,
    }
}

/// A pointer fault, mostly none, so valid calls are drawn often too.
fn pfault() -> impl Strategy<Value = u8> {
    prop_oneof![4 => Just(0u8), 1 => 1u8..4]
}

/// The arguments whose pointer fault is real: a NULL buffer of no elements is no fault.
fn faulted(args: &[(u8, usize, &'static str)]) -> Vec<&'static str> {
    args.iter().filter(|(f, n, _)| *f != 0 && !(*f == 1 && *n == 0)).map(|a| a.2).collect()
}

/// The expected outcome when the Rust call would give `rust` and `faults` name the C-only faults:
/// any of them, or the Rust call's field, may be reported first.
fn with_fault(rust: Expect, faults: Vec<&'static str>) -> Expect {
    match (rust, faults.as_slice()) {
        (e, []) => e,
        (Expect::Ok, [f]) => invalid(*f),
        (Expect::Ok, _) => {
            Expect::InvalidWhere("one of the faulted arguments", Rc::new(move |x| faults.contains(&x)))
        }
        (Expect::Invalid(g), _) => Expect::InvalidWhere(
            "a faulted argument or the Rust call's field",
            Rc::new(move |x| x == g || faults.contains(&x)),
        ),
        (e, _) => e,
    }
}

/// The layout every case uses: 2 sequences x 2 KV heads, Full segments with room to grow and
/// Streaming ones (sink 2, window 4).
fn layout() -> LayerLayout {
    LayoutBuilder::new(2, 2)
        .headroom(512)
        .full(0, 0, 6)
        .streaming(0, 1, 2, 4)
        .full(1, 0, 3)
        .streaming(1, 1, 2, 4)
        .build()
        .expect("valid")
}

/// A C layout handle holding `layout`.
fn c_layout(layout: &LayerLayout) -> *mut HeadwiseLayout {
    let segs = layout.segments();
    let f = |g: fn(&Segment) -> u32| segs.iter().map(g).collect::<Vec<u32>>();
    let (off, cap, len, ring) = (f(|s| s.offset), f(|s| s.capacity), f(|s| s.len), f(|s| s.ring_head));
    let (sink, window) = (
        f(|s| if let SegmentMode::Streaming { sink, .. } = s.mode { sink } else { 0 }),
        f(|s| if let SegmentMode::Streaming { window, .. } = s.mode { window } else { 0 }),
    );
    let mode: Vec<i32> = segs
        .iter()
        .map(|s| if s.mode == SegmentMode::Full { HEADWISE_MODE_FULL } else { HEADWISE_MODE_STREAMING })
        .collect();
    let mut out = null_mut();
    // SAFETY: arrays of num_segments elements; out-pointer to a local.
    let code = unsafe {
        headwise_layout_create(
            layout.batch(),
            layout.kv_heads(),
            layout.total_rows() as u64,
            segs.len(),
            off.as_ptr(),
            cap.as_ptr(),
            len.as_ptr(),
            ring.as_ptr(),
            mode.as_ptr(),
            sink.as_ptr(),
            window.as_ptr(),
            &mut out,
        )
    };
    assert_eq!(code, HEADWISE_OK, "{}", last_message());
    out
}

/// A live emulator cache (bf16, head_dim 64) over `k`/`v`, and its Rust mirror.
struct Pair {
    store: *mut HeadwiseStore,
    layout: *mut HeadwiseLayout,
    cache: *mut HeadwiseCache,
    _k: HostMem,
    _v: HostMem,
    rust: LayerCache<EmuStore, bf16>,
}

impl Pair {
    fn new() -> Pair {
        Pair::with(layout())
    }
    fn with(l: LayerLayout) -> Pair {
        let bytes = l.total_rows() * D * 2;
        let (k, v) = (HostMem::new(bytes), HostMem::new(bytes));
        let (mut store, mut cache) = (null_mut(), null_mut());
        let layout = c_layout(&l);
        // SAFETY: k/v hold total_rows * D bf16 each; out-pointers to locals.
        unsafe {
            assert_eq!(headwise_emulator_create(&mut store), HEADWISE_OK);
            let code =
                headwise_cache_create(store, layout, HEADWISE_DTYPE_BF16, D, k.ptr(), v.ptr(), &mut cache);
            assert_eq!(code, HEADWISE_OK, "{}", last_message());
        }
        let rust = LayerCache::new(&EmuStore, l, D).expect("valid");
        Pair { store, layout, cache, _k: k, _v: v, rust }
    }
    fn segments(&self) -> usize {
        self.rust.layout().segments().len()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // SAFETY: live handles made in new, freed once.
        unsafe {
            headwise_cache_free(self.cache);
            headwise_layout_free(self.layout);
            headwise_store_free(self.store);
        }
    }
}

pub(super) fn emulator_side(b: &mut Battery) {
    cache_create(b);
    cache_append(b);
    cache_attention(b);
    cache_relayout_into(b);
    cache_compress_into(b);
    cache_expected_attention_scores(b);
    query_ring(b);
    cache_evict(b);
    cache_h2o(b);
    cache_chunk(b);
}

fn cache_create(b: &mut Battery) {
    let l = layout();
    let bytes = l.total_rows() * 256 * 2;
    let mem = HostMem::new(bytes);
    let head_dims = [64usize, 128, 256, 0, 100, 512];
    b.run(
        "C headwise_cache_create (emulator)",
        300,
        (
            prop_oneof![3 => 0i32..2, 1 => Just(2)],
            prop_oneof![3 => 0usize..3, 1 => 3usize..6],
            pfault(),
            pfault(),
        ),
        |p, (dtype, hd, kf, vf)| {
            let hd = head_dims[hd];
            let n = l.total_rows() * hd;
            let expect = if dtype == 2 {
                invalid("dtype")
            } else if let Err(e) = check_head_dim(hd) {
                expect_of::<()>(Err(e))
            } else {
                with_fault(Expect::Ok, faulted(&[(kf, n, "k"), (vf, n, "v")]))
            };
            let (mut store, mut cache) = (null_mut(), poison());
            let layout = c_layout(&l);
            let base = mem.ptr();
            // SAFETY: mem holds total_rows * 256 * 2 bytes (+16): any head_dim accepted fits.
            let ok = unsafe {
                assert_eq!(headwise_emulator_create(&mut store), HEADWISE_OK);
                let r = p.c_call(expect, || {
                    headwise_cache_create(
                        store,
                        layout,
                        dtype,
                        hd,
                        fault_ptr(base, kf),
                        fault_ptr(base, vf),
                        &mut cache,
                    )
                });
                headwise_layout_free(layout);
                let r = r.and_then(|ok| check_out(ok, cache, headwise_cache_free).map(|_| ok));
                headwise_store_free(store);
                r
            }?;
            let _ = ok;
            Ok(())
        },
    );
}

fn cache_append(b: &mut Battery) {
    let pair = RefCell::new(Pair::new());
    let src = HostMem::new(pair.borrow().segments() * D * 2);
    b.run("C headwise_cache_append (emulator)", 150, (pfault(), pfault()), |p, (kf, vf)| {
        let mut pair = pair.borrow_mut();
        let n = pair.segments() * D;
        let fault = faulted(&[(kf, n, "k_new"), (vf, n, "v_new")]);
        // Only a call the C side also makes changes the mirror.
        let expect = if fault.is_empty() {
            expect_of(pair.rust.append(&EmuBuf::zeros(n).unwrap(), &EmuBuf::zeros(n).unwrap()))
        } else if let Err(full) = pair.rust.layout().check_appendable() {
            // Once a Full segment has no free row (long runs get there), NULL and unaligned
            // element pointers are still caught first, when the C side wraps them; a 16-bit
            // aligned pointer gets to the full segment before the kernels' 16-byte check.
            let early = faulted(&[
                (if kf == 2 { 0 } else { kf }, n, "k_new"),
                (if vf == 2 { 0 } else { vf }, n, "v_new"),
            ]);
            if early.is_empty() { expect_of::<()>(Err(full)) } else { with_fault(Expect::Ok, early) }
        } else {
            with_fault(Expect::Ok, fault)
        };
        let base = src.ptr();
        // SAFETY: src holds n bf16 (+16 bytes); the cache is live.
        p.c_call(expect, || unsafe {
            headwise_cache_append(pair.cache, fault_ptr(base, kf), fault_ptr(base, vf))
        })?;
        Ok(())
    });
}

fn cache_attention(b: &mut Battery) {
    let pair = Pair::new();
    let n = pair.segments() * MAX_G * D;
    let (q, out, lse) = (HostMem::new(n * 2), HostMem::new(n * 2), HostMem::new(pair.segments() * MAX_G * 4));
    let ws = RefCell::new(AttentionWorkspace::new());
    b.run(
        "C headwise_cache_attention (emulator)",
        300,
        (prop_oneof![3 => 1usize..=16, 1 => 0usize..=MAX_G], pfault(), pfault(), pfault(), 0u32..6),
        |p, (g, qf, of, lf, chunk)| {
            let heads = pair.segments() * g;
            let opts = AttentionOptions { scale: None, chunk_tokens: (chunk != 0).then_some(chunk) };
            let (rq, mut rout, mut rlse) = (
                EmuBuf::zeros((heads * D).max(1)).unwrap(),
                EmuBuf::zeros((heads * D).max(1)).unwrap(),
                EmuBuf::<f32>::zeros(heads.max(1)).unwrap(),
            );
            let rust = expect_of(pair.rust.attention(
                &rq,
                g,
                &mut rout,
                Some(&mut rlse),
                &mut ws.borrow_mut(),
                &opts,
            ));
            // A NULL lse is "no LSE wanted", not a fault.
            let fault = faulted(&[
                (qf, heads * D, "q"),
                (of, heads * D, "out"),
                (if lf >= 2 { lf } else { 0 }, heads, "lse"),
            ]);
            let (qp, op, lp) = (fault_ptr(q.ptr(), qf), fault_ptr(out.ptr(), of), fault_ptr(lse.ptr(), lf));
            // SAFETY: q/out hold segments * MAX_G * D bf16, lse segments * MAX_G f32 (+16 bytes).
            p.c_call(with_fault(rust, fault), || unsafe {
                headwise_cache_attention(pair.cache, qp, g, op, lp.cast(), 0.0, chunk)
            })?;
            Ok(())
        },
    );
}

fn cache_relayout_into(b: &mut Battery) {
    let pair = Pair::new();
    b.run(
        "C headwise_cache_relayout_into (emulator)",
        150,
        (0u32..64, prop::bool::weighted(0.2), pfault(), pfault()),
        |p, (headroom, other, kf, vf)| {
            // A regrown copy of the layout, or one with other segments (refused).
            let target = if other {
                LayoutBuilder::new(1, 2).headroom(headroom).full(0, 0, 1).full(0, 1, 1).build().unwrap()
            } else {
                pair.rust.layout().regrown(headroom).unwrap()
            };
            let n = target.total_rows() * D;
            let (mut kd, mut vd) = (EmuBuf::<bf16>::zeros(n).unwrap(), EmuBuf::<bf16>::zeros(n).unwrap());
            let rust = expect_of(pair.rust.relayout_into(&target, &mut kd, &mut vd));
            let fault = faulted(&[(kf, n, "k_dst"), (vf, n, "v_dst")]);
            let (km, vm) = (HostMem::new(n * 2), HostMem::new(n * 2));
            let t = c_layout(&target);
            let (kp, vp) = (fault_ptr(km.ptr(), kf), fault_ptr(vm.ptr(), vf));
            // SAFETY: km/vm hold target.total_rows * D bf16 (+16 bytes); live handles.
            let r = p.c_call(with_fault(rust, fault), || unsafe {
                headwise_cache_relayout_into(pair.cache, t, kp, vp)
            });
            // SAFETY: made above, freed once.
            unsafe { headwise_layout_free(t) };
            r.map(drop)
        },
    );
}

fn cache_compress_into(b: &mut Battery) {
    b.run(
        "C headwise_cache_compress_into (emulator)",
        200,
        // Biased towards the cache's shape (2 x 2 Full segments of 24 rows), so valid calls are
        // drawn often.
        (
            (prop_oneof![3 => Just(2usize), 1 => 1usize..4], prop_oneof![3 => Just(2usize), 1 => 1usize..4], 1usize..4, 0usize..40),
            (0u32..3, prop_oneof![4 => 0i32..2, 1 => Just(2)], prop_oneof![4 => 0i32..2, 1 => Just(2)], prop_oneof![4 => Just(0i32), 1 => 0i32..3]),
            (
                prop_oneof![3 => prop::collection::vec(8u32..24, 4), 1 => prop::collection::vec(0u32..40, 0..6)],
                pfault(),
                pfault(),
                pfault(),
            ),
        ),
        |p, ((batch, kv_heads, group, q_len), (window, pool, gqa, gran), (budgets, kf, vf, qf))| {
            let full = LayoutBuilder::new(2, 2).headroom(24).full(0, 0, 0).full(0, 1, 0).full(1, 0, 0).full(1, 1, 0);
            let mut pair = Pair::with(full.build().expect("valid"));
            let window = [0usize, 4, 8][window as usize];
            let kv = batch * kv_heads * q_len * D;
            let qn = batch * kv_heads * group * window * D;
            let (k, v, qs) = (HostMem::new(kv * 2), HostMem::new(kv * 2), HostMem::new(qn * 2));
            let code_field = [(pool, "opts.pool"), (gqa, "opts.gqa"), (gran, "opts.granularity")]
                .into_iter()
                .find(|(c, _)| *c == 2)
                .map(|(_, f)| f);
            let expect = match code_field {
                Some(f) => invalid(f),
                None => {
                    let opts = SelectOptions {
                        window,
                        pool: if pool == 0 { Pool::Max } else { Pool::Avg },
                        gqa: if gqa == 0 { GqaReduce::Mean } else { GqaReduce::Max },
                        granularity: if gran == 0 { Granularity::KvHead } else { Granularity::QueryHead },
                        ..SelectOptions::default()
                    };
                    let (rk, rv, rq) = (
                        EmuBuf::<bf16>::zeros(kv).unwrap(),
                        EmuBuf::<bf16>::zeros(kv).unwrap(),
                        EmuBuf::<bf16>::zeros(qn).unwrap(),
                    );
                    let prompt = Prompt {
                        k: &rk,
                        v: &rv,
                        queries: &rq,
                        batch,
                        kv_heads,
                        group_size: group,
                        q_len,
                        head_dim: D,
                        packing: Default::default(),
                    };
                    let rust = expect_of(compress_into(
                        &mut pair.rust,
                        &prompt,
                        Budgets::PerRow(&budgets),
                        &opts,
                        &mut SelectWorkspace::new(),
                    ));
                    let fault = faulted(&[(kf, kv, "prompt.k"), (vf, kv, "prompt.v"), (qf, qn, "prompt.queries")]);
                    with_fault(rust, fault)
                }
            };
            let mut opts = std::mem::MaybeUninit::<HeadwiseSelectOptions>::uninit();
            // SAFETY: out-pointer to a local.
            assert_eq!(unsafe { headwise_select_options_default(opts.as_mut_ptr()) }, HEADWISE_OK);
            // SAFETY: just written.
            let mut opts = unsafe { opts.assume_init() };
            (opts.window, opts.pool, opts.gqa, opts.granularity) = (window as u32, pool, gqa, gran);
            let prompt = HeadwisePrompt {
                k: fault_ptr(k.ptr(), kf),
                v: fault_ptr(v.ptr(), vf),
                queries: fault_ptr(qs.ptr(), qf),
                batch,
                kv_heads,
                group_size: group,
                q_len,
                cu_seqlens: std::ptr::null(),
            };
            // SAFETY: the prompt's memory holds the sizes it states (+16 bytes); live cache.
            p.c_call(expect, || unsafe {
                headwise_cache_compress_into(pair.cache, &prompt, &opts, budgets.as_ptr(), budgets.len())
            })?;
            Ok(())
        },
    );
}

fn cache_expected_attention_scores(b: &mut Battery) {
    use headwise::scores::{ExpectedAttention, ScoreWorkspace, expected_attention};
    b.run(
        "C headwise_cache_expected_attention_scores (emulator)",
        200,
        (
            (
                1usize..3,
                1usize..3,
                prop_oneof![4 => 1usize..5, 1 => Just(0usize)],
                // Mostly in range (window 1..4 below q, sinks below the prefix), so valid calls
                // are drawn often too.
                prop_oneof![3 => 6usize..24, 1 => 1usize..6],
                prop_oneof![3 => 1usize..4, 1 => 0usize..26],
                prop_oneof![3 => 0usize..3, 1 => 0usize..26],
            ),
            (prop_oneof![4 => Just(0usize), 1 => 0usize..3], pfault(), pfault(), pfault()),
            (pfault(), pfault(), prop_oneof![3 => Just(false), 1 => Just(true)]),
        ),
        |p, ((batch, kv_heads, group, q, window, sink), (delta, kf, vf, mf), (cf, sf, vnorm_off))| {
            let pair = Pair::new();
            let segments = batch * kv_heads;
            let kv = segments * q * D;
            let mean = segments * group * D;
            // One length off now and then (the C caller's count disagrees with the shape).
            let cov = segments * group * D * D + delta;
            let n = q.saturating_sub(window);
            let out = segments * n;
            let opts = ExpectedAttention { sink, use_vnorm: !vnorm_off, ..ExpectedAttention::default() };
            let (k, v) = (HostMem::new(kv * 2), HostMem::new(kv * 2));
            let (m, c, o) = (HostMem::new(mean * 4), HostMem::new(cov * 4), HostMem::new(out * 4));
            // A NULL covariance is no fault: it means none.
            let with_cov = cf != 1;
            let rust = {
                let s = EmuStore;
                let (rk, rv, none) = (
                    EmuBuf::<bf16>::zeros(kv).unwrap(),
                    EmuBuf::<bf16>::zeros(kv).unwrap(),
                    EmuBuf::<bf16>::zeros(0).unwrap(),
                );
                let prompt = Prompt {
                    k: &rk,
                    v: &rv,
                    queries: &none,
                    batch,
                    kv_heads,
                    group_size: group,
                    q_len: q,
                    head_dim: D,
                    packing: Default::default(),
                };
                let (rm, rc) = (EmuBuf::<f32>::zeros(mean).unwrap(), EmuBuf::<f32>::zeros(cov).unwrap());
                let mut ro = EmuBuf::<f32>::zeros(out).unwrap();
                expect_of(expected_attention(
                    &s,
                    &prompt,
                    &rm,
                    with_cov.then_some(&rc),
                    window,
                    &opts,
                    &mut ro,
                    &mut ScoreWorkspace::new(),
                ))
            };
            // f32 buffers are only checked for alignment when they hold elements (a buffer of
            // none is never read); the prompt's rows always are (16 bytes, for the kernels).
            let f32_buf = |f: u8, n: usize, field| (if n == 0 { 0 } else { f }, n, field);
            let mut faults = faulted(&[
                (kf, kv, "prompt.k"),
                (vf, kv, "prompt.v"),
                f32_buf(mf, mean, "mean"),
                f32_buf(sf, out, "scores"),
            ]);
            if with_cov {
                faults.extend(faulted(&[f32_buf(cf, cov, "cov")]));
            }
            let expect = with_fault(rust, faults);
            let prompt = HeadwisePrompt {
                k: fault_ptr(k.ptr(), kf),
                v: fault_ptr(v.ptr(), vf),
                queries: null_mut(),
                batch,
                kv_heads,
                group_size: group,
                q_len: q,
                cu_seqlens: std::ptr::null(),
            };
            let c_opts = HeadwiseExpectedAttentionOptions {
                sink: sink as u32,
                use_vnorm: i32::from(!vnorm_off),
                epsilon: opts.epsilon,
            };
            // SAFETY: every buffer holds the count passed (+16 bytes); live cache.
            p.c_call(expect, || unsafe {
                headwise_cache_expected_attention_scores(
                    pair.cache,
                    &prompt,
                    fault_ptr(m.ptr(), mf).cast(),
                    mean,
                    fault_ptr(c.ptr(), cf).cast(),
                    cov,
                    window as u32,
                    &c_opts,
                    fault_ptr(o.ptr(), sf).cast(),
                    out,
                )
            })?;
            Ok(())
        },
    );
}

fn query_ring(b: &mut Battery) {
    let mut store = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { headwise_emulator_create(&mut store) }, HEADWISE_OK);
    let head_dims = [64usize, 128, 0, 100];
    b.run(
        "C headwise_query_ring_create/push (emulator)",
        200,
        (0i32..3, 0usize..24, 0usize..20, 0usize..head_dims.len(), 0u8..4),
        |p, (dtype, heads, alpha, hd, qf)| {
            let hd = head_dims[hd];
            let expect = if dtype == 2 {
                invalid("dtype")
            } else {
                expect_of(QueryRing::<EmuStore, bf16>::new(&EmuStore, heads, alpha, hd))
            };
            let mut ring = poison();
            // SAFETY: a live store; out-pointer to a local.
            let made = p.c_call(expect, || unsafe {
                headwise_query_ring_create(store, dtype, heads, alpha, hd, &mut ring)
            })?;
            if !made {
                return check(ring.is_null(), || "failure left a non-NULL ring".into());
            }
            let q = HostMem::new(heads * hd * 2);
            let fault = faulted(&[(qf, heads * hd, "q")]);
            let qp = fault_ptr(q.ptr(), qf);
            // SAFETY: q holds heads * head_dim elements (+16 bytes); a live ring.
            let r = p.c_call(with_fault(Expect::Ok, fault), || unsafe { headwise_query_ring_push(ring, qp) });
            // SAFETY: made above, freed once.
            unsafe { headwise_query_ring_free(ring) };
            r.map(drop)
        },
    );
    // SAFETY: made above, freed once.
    unsafe { headwise_store_free(store) };
}

fn cache_evict(b: &mut Battery) {
    let pair = RefCell::new(Pair::new());
    let segs = pair.borrow().segments();
    let (c_store, c_cache) = (pair.borrow().store, pair.borrow().cache);
    let group = 2;
    // Rings of both dtypes in C, and the mirror's.
    let (mut ring, mut ring_f16) = (null_mut(), null_mut());
    // SAFETY: a live store; out-pointers to locals.
    unsafe {
        assert_eq!(
            headwise_query_ring_create(c_store, HEADWISE_DTYPE_BF16, segs * group, 8, D, &mut ring),
            HEADWISE_OK
        );
        assert_eq!(
            headwise_query_ring_create(c_store, HEADWISE_DTYPE_F16, segs * group, 8, D, &mut ring_f16),
            HEADWISE_OK
        );
    }
    let rust_ring = QueryRing::<EmuStore, bf16>::new(&EmuStore, segs * group, 8, D).unwrap();
    let ws = RefCell::new(RkvWorkspace::new());
    let lambdas = [0.07, 0.0, 1.0, -0.5, 1.5, f64::NAN];
    b.run(
        "C headwise_cache_evict (emulator)",
        300,
        // Biased towards valid calls, so both outcomes are drawn often.
        (
            (
                prop_oneof![3 => Just(group), 1 => 0usize..5],
                0u32..40,
                prop_oneof![Just(8u32), 0u32..20],
                prop_oneof![Just(7u32), 0u32..10],
            ),
            (
                prop_oneof![2 => Just(0usize), 1 => 0usize..lambdas.len()],
                prop_oneof![3 => Just(segs), 1 => 0usize..7],
                prop_oneof![Just(0usize), Just(segs), 0usize..7],
                prop::bool::weighted(0.2),
            ),
        ),
        |p, ((g, budget, alpha, kernel), (lambda, forced_len, compacted_len, other_ring))| {
            let opts = RkvOptions {
                budget: budget as usize,
                alpha: alpha as usize,
                kernel: kernel as usize,
                lambda: lambdas[lambda],
                ..RkvOptions::new(budget as usize)
            };
            // All false: a valid call compacts nothing, so the mirror and the C cache stay equal.
            let forced = vec![false; forced_len];
            let rust = expect_of(evict(
                &mut pair.borrow_mut().rust,
                &rust_ring,
                g,
                &opts,
                RkvTrigger::Forced(&forced),
                &mut ws.borrow_mut(),
            ));
            let mut faults = Vec::new();
            if compacted_len != 0 && compacted_len != segs {
                faults.push("compacted_len");
            }
            if other_ring {
                faults.push("ring");
            }
            let expect = with_fault(rust, faults);
            let c_opts = HeadwiseRkvOptions {
                budget,
                buffer: opts.buffer as u32,
                alpha,
                kernel,
                lambda: lambdas[lambda],
                fidelity_quirk: 0,
            };
            let forced_c = vec![0u8; forced_len];
            let mut compacted = vec![9u8; compacted_len];
            let r = if other_ring { ring_f16 } else { ring };
            let cp = if compacted_len == 0 { null_mut() } else { compacted.as_mut_ptr() };
            // SAFETY: live handles; arrays of the lengths given.
            p.c_call(expect, || unsafe {
                headwise_cache_evict(c_cache, r, g, &c_opts, forced_c.as_ptr(), forced_len, cp, compacted_len)
            })?;
            Ok(())
        },
    );
    // SAFETY: made above, freed once.
    unsafe {
        headwise_query_ring_free(ring);
        headwise_query_ring_free(ring_f16);
    }
}

/// H2O through C: attention with mass and the eviction by it, pointer faults (NULL, misaligned
/// mass), wrong mass counts, budgets and recent windows out of range, compacted_len; the Rust
/// mirror's outcome otherwise. The eviction's validation does not depend on the lengths, so a
/// mirror that compacted where the C call was refused still predicts the next case.
fn cache_h2o(b: &mut Battery) {
    let pair = RefCell::new(Pair::new());
    let segs = pair.borrow().segments();
    let rows = pair.borrow().rust.layout().total_rows();
    let c_cache = pair.borrow().cache;
    let ws = RefCell::new(H2oWorkspace::new());
    let aws = RefCell::new(AttentionWorkspace::new());
    b.run(
        "C headwise_cache_evict_by_mass / attention_with_mass (emulator)",
        300,
        (
            (prop_oneof![3 => 1u32..40, 1 => 0u32..3], 0u32..12, prop_oneof![4 => Just(0i64), 1 => -3i64..4]),
            (pfault(), prop_oneof![Just(0usize), Just(segs), 0usize..7], any::<bool>()),
        ),
        |p, ((budget, recent, delta), (mf, compacted_len, attend))| {
            let num_mass = (rows as i64 + delta).max(0) as usize;
            let m = HostMem::new(num_mass * 4);
            let mut rust_mass = EmuBuf::<f32>::zeros(num_mass).unwrap();
            let mass_fault = faulted(&[(if num_mass == 0 { 0 } else { mf }, num_mass, "mass")]);
            if attend {
                let g = 2;
                let n = segs * g * D;
                let (q, o) = (HostMem::new(n * 2), HostMem::new(n * 2));
                let (rq, mut ro) = (EmuBuf::<bf16>::zeros(n).unwrap(), EmuBuf::<bf16>::zeros(n).unwrap());
                let rust = expect_of(pair.borrow().rust.attention_with_mass(
                    &rq,
                    g,
                    &mut ro,
                    None,
                    &mut aws.borrow_mut(),
                    &AttentionOptions::default(),
                    &mut rust_mass,
                ));
                let expect = with_fault(rust, mass_fault);
                // SAFETY: buffers of the counts passed (+16 bytes); live cache.
                p.c_call(expect, || unsafe {
                    headwise_cache_attention_with_mass(
                        c_cache,
                        q.ptr(),
                        g,
                        o.ptr(),
                        null_mut(),
                        0.0,
                        0,
                        fault_ptr(m.ptr(), mf).cast(),
                        num_mass,
                    )
                })?;
                return Ok(());
            }
            let opts = H2oOptions { budget: budget as usize, recent: recent as usize };
            let rust = expect_of(evict_by_mass(
                &mut pair.borrow_mut().rust,
                &mut rust_mass,
                &opts,
                &mut ws.borrow_mut(),
            ));
            let mut faults = mass_fault;
            if compacted_len != 0 && compacted_len != segs {
                faults.push("compacted_len");
            }
            let expect = with_fault(rust, faults);
            let mut compacted = vec![9u8; compacted_len];
            let cp = if compacted_len == 0 { null_mut() } else { compacted.as_mut_ptr() };
            // SAFETY: buffers of the counts passed (+16 bytes); live cache.
            p.c_call(expect, || unsafe {
                headwise_cache_evict_by_mass(
                    c_cache,
                    fault_ptr(m.ptr(), mf).cast(),
                    num_mass,
                    budget,
                    recent,
                    cp,
                    compacted_len,
                )
            })?;
            Ok(())
        },
    );
}

/// `headwise_cache_append_tokens`, `headwise_cache_attention_chunk`, `headwise_cache_rollback`
/// on one live pair: appends of 0..4 tokens (0 is a fault), chunks of 0..8 queries over a layout
/// whose rings have window 4 (5..8 refused, and 0), rollbacks with wrong counts, NULL arrays and
/// counts above a segment's length. The mirror advances only when the C call does too.
fn cache_chunk(b: &mut Battery) {
    let pair = RefCell::new(Pair::new());
    let segs = pair.borrow().segments();
    let c_cache = pair.borrow().cache;
    let kv = HostMem::new(4 * segs * D * 2);
    let max_rows = 8 * 4 * segs;
    let (q, out, lse) =
        (HostMem::new(max_rows * D * 2), HostMem::new(max_rows * D * 2), HostMem::new(max_rows * 4));
    let ws = RefCell::new(AttentionWorkspace::new());
    let op = prop_oneof![
        (0usize..5, pfault(), pfault()).prop_map(|(t, kf, vf)| (0u8, t, kf, vf, vec![])),
        (0usize..9, 1usize..5, pfault(), pfault()).prop_map(|(ql, g, qf, of)| (
            1u8,
            ql * 16 + g,
            qf,
            of,
            vec![]
        )),
        (proptest::collection::vec(0u32..5, 0..4), any::<bool>()).prop_map(|(c, null)| (
            2u8,
            0,
            u8::from(null),
            0,
            c
        )),
    ];
    b.run(
        "C headwise_cache_append_tokens / attention_chunk / rollback (emulator)",
        600,
        op,
        |p, (kind, x, f1, f2, counts)| {
            let mut pair = pair.borrow_mut();
            match kind {
                0 => {
                    let t = x;
                    let n = segs * t * D;
                    let fault = faulted(&[(f1, n, "k_new"), (f2, n, "v_new")]);
                    let expect = if t == 0 {
                        with_fault(invalid("tokens"), fault)
                    } else if fault.is_empty() {
                        expect_of(pair.rust.append_tokens(
                            &EmuBuf::zeros(n).unwrap(),
                            &EmuBuf::zeros(n).unwrap(),
                            t,
                        ))
                    } else if let Err(full) = pair.rust.layout().check_room(t) {
                        // As for append: only NULL and unaligned-element pointers come before the
                        // room check; the 16-byte row check comes after it.
                        let early = faulted(&[
                            (if f1 == 2 { 0 } else { f1 }, n, "k_new"),
                            (if f2 == 2 { 0 } else { f2 }, n, "v_new"),
                        ]);
                        if early.is_empty() {
                            expect_of::<()>(Err(full))
                        } else {
                            with_fault(Expect::Ok, early)
                        }
                    } else {
                        with_fault(Expect::Ok, fault)
                    };
                    // SAFETY: kv holds 4 * segs * D bf16 (+16 bytes); the cache is live.
                    p.c_call(expect, || unsafe {
                        headwise_cache_append_tokens(
                            c_cache,
                            fault_ptr(kv.ptr(), f1),
                            fault_ptr(kv.ptr(), f2),
                            t,
                        )
                    })?;
                }
                1 => {
                    let (ql, g) = (x / 16, x % 16);
                    let rows = segs * g * ql;
                    let (rq, mut ro, mut rl) = (
                        EmuBuf::<bf16>::zeros((rows * D).max(1)).unwrap(),
                        EmuBuf::<bf16>::zeros((rows * D).max(1)).unwrap(),
                        EmuBuf::<f32>::zeros(rows.max(1)).unwrap(),
                    );
                    let rust = expect_of(pair.rust.attention_chunk(
                        &rq,
                        ql,
                        g,
                        &mut ro,
                        Some(&mut rl),
                        &mut ws.borrow_mut(),
                        &AttentionOptions::default(),
                    ));
                    let fault = faulted(&[(f1, rows * D, "q"), (f2, rows * D, "out")]);
                    // SAFETY: q/out hold 8 * 4 * segs * D bf16, lse that many f32 (+16 bytes).
                    p.c_call(with_fault(rust, fault), || unsafe {
                        headwise_cache_attention_chunk(
                            c_cache,
                            fault_ptr(q.ptr(), f1),
                            ql,
                            g,
                            fault_ptr(out.ptr(), f2),
                            lse.ptr().cast(),
                            0.0,
                            0,
                        )
                    })?;
                }
                _ => {
                    let is_null = f1 == 1 && !counts.is_empty();
                    let expect =
                        if is_null { invalid("tokens") } else { expect_of(pair.rust.rollback(&counts)) };
                    let ptr = if is_null { null() } else { counts.as_ptr() };
                    // SAFETY: counts.len() readable u32 (or NULL); the cache is live.
                    p.c_call(expect, || unsafe { headwise_cache_rollback(c_cache, ptr, counts.len()) })?;
                }
            }
            // The C cache and the mirror agree after every call.
            let mut l = null_mut();
            // SAFETY: live cache, out-pointer to a local.
            unsafe { assert_eq!(headwise_cache_layout(c_cache, &mut l), HEADWISE_OK) };
            let mut lens = vec![0u32; segs];
            // SAFETY: arrays of segs entries; the other outputs NULL.
            let code = unsafe {
                headwise_layout_segments(
                    l,
                    segs,
                    null_mut(),
                    null_mut(),
                    lens.as_mut_ptr(),
                    null_mut(),
                    null_mut(),
                    null_mut(),
                    null_mut(),
                )
            };
            unsafe { headwise_layout_free(l) };
            assert_eq!(code, HEADWISE_OK, "{}", last_message());
            let want: Vec<u32> = pair.rust.layout().segments().iter().map(|s| s.len).collect();
            check(lens == want, || format!("C lens {lens:?}, mirror {want:?}"))
        },
    );
}
