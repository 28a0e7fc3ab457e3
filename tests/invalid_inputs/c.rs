//! The C ABI (feature `capi`): the `extern "C"` functions called directly, with the faults only
//! a C caller can make (NULL pointers, lengths that disagree, unknown enum codes, bytes that are
//! not UTF-8) and, through the same generators as the Rust entries, the faults the Rust API
//! refuses. The expected outcome of a C call is the Rust call's on the same input where one
//! exists. Part of tests/invalid_inputs.rs (`mod c`).

use super::*;
use headwise::capi::*;
use std::ffi::{c_char, c_int};
use std::ptr::{NonNull, null, null_mut};

#[path = "emulator_side.rs"]
mod emulator_side;

pub(super) const ENTRY_POINTS: &[fn(&mut Battery)] = &[
    layout_create,
    layout_pack,
    budget_uniform_c,
    budget_pyramid_c,
    budget_headkv_c,
    gates_parse,
    gates_select,
    scores_parse,
    duo_config_c,
    gpu_side,
    emulator_side::emulator_side,
];

/// The thread's last error message.
fn last_message() -> String {
    // SAFETY: NULL with length 0 asks for the length; then a buffer of that length + 1.
    let n = unsafe { headwise_last_error_message(null_mut(), 0) };
    let mut buf = vec![0u8; n + 1];
    let m = unsafe { headwise_last_error_message(buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(m, n);
    buf.truncate(n);
    String::from_utf8(buf).expect("the last error message is UTF-8")
}

/// What the Rust API's result says a C call must return.
pub(super) fn expect_of<T>(r: headwise::Result<T>) -> Expect {
    match r {
        Ok(_) => Expect::Ok,
        Err(Error::Invalid { field, .. }) => Expect::Invalid(field),
        Err(Error::SegmentFull { segment, .. }) => Expect::SegmentFull(segment),
        Err(Error::NoGpu(_) | Error::NoKernels) => Expect::NoDevice,
        Err(e) => Expect::InvalidWhere("never (the Rust call failed otherwise)", {
            let _ = e;
            Rc::new(|_| false)
        }),
    }
}

impl Probe<'_> {
    /// Runs one C call: it must not unwind or return `HEADWISE_ERROR_PANIC` (a panic),
    /// must return the code `expect` says, `headwise_last_error_code` must agree, and the
    /// last error message must be empty after success, else non-empty and, for
    /// `Invalid`, name the field (`invalid FIELD: reason`). Returns whether it succeeded.
    pub(super) fn c_call(&self, expect: Expect, f: impl FnOnce() -> c_int) -> Result<bool, TestCaseError> {
        let got = catch_unwind(AssertUnwindSafe(f));
        let mut t = self.tally.borrow_mut();
        t.cases += 1;
        let Ok(code) = got else {
            t.panics += 1;
            return Err(TestCaseError::fail(format!("unwound out of the C ABI; expected {expect:?}")));
        };
        let (last, msg) = (headwise_last_error_code(), last_message());
        if code == HEADWISE_ERROR_PANIC {
            t.panics += 1;
            return Err(TestCaseError::fail(format!("HEADWISE_ERROR_PANIC ({msg}); expected {expect:?}")));
        }
        if last != code {
            return Err(TestCaseError::fail(format!("returned {code}, last error code {last}")));
        }
        if code == HEADWISE_OK {
            t.oks += 1;
            check(msg.is_empty(), || format!("success left the message {msg:?}"))?;
            return match expect {
                Expect::Ok => Ok(true),
                _ => Err(TestCaseError::fail(format!("returned HEADWISE_OK; expected {expect:?}"))),
            };
        }
        t.errors += 1;
        let ok = !msg.is_empty()
            && match (&expect, code) {
                (Expect::Invalid(want), HEADWISE_ERROR_INVALID_ARGUMENT) => {
                    msg.starts_with(&format!("invalid {want}: "))
                }
                (Expect::InvalidWhere(_, real), HEADWISE_ERROR_INVALID_ARGUMENT) => msg
                    .strip_prefix("invalid ")
                    .is_some_and(|rest| rest.match_indices(": ").any(|(i, _)| real(&rest[..i]))),
                (Expect::SegmentFull(s), HEADWISE_ERROR_SEGMENT_FULL) => {
                    msg.starts_with(&format!("segment {s} is full"))
                }
                // A build without the `cuda` feature has no GPU path at all.
                (
                    Expect::NoDevice,
                    HEADWISE_ERROR_NO_GPU | HEADWISE_ERROR_NO_KERNELS | HEADWISE_ERROR_FEATURE_OFF,
                ) => true,
                _ => false,
            };
        if ok {
            Ok(false)
        } else {
            Err(TestCaseError::fail(format!("returned {code} ({msg:?}); expected {expect:?}")))
        }
    }
}

/// A non-NULL out-pointer value that no call may leave behind on failure.
fn poison<T>() -> *mut T {
    NonNull::dangling().as_ptr()
}

/// After a call that takes `out` for a new handle: NULL on failure, else a handle freed here.
fn check_out<T>(
    ok: bool,
    out: *mut T,
    free: unsafe extern "C" fn(*mut T) -> c_int,
) -> Result<(), TestCaseError> {
    if ok {
        check(!out.is_null(), || "success without a handle".into())?;
        // SAFETY: a live handle just made, freed once.
        check(unsafe { free(out) } == HEADWISE_OK, || "free failed".into())
    } else {
        check(out.is_null(), || "failure left a non-NULL handle".into())
    }
}

fn nul_or<T>(v: &[T], null_it: bool) -> *const T {
    if null_it { null() } else { v.as_ptr() }
}

#[derive(Clone, Debug)]
enum CreateFault {
    /// The Rust fault only.
    None,
    /// NULL for offset, capacity, len or mode (`0..4`).
    NullArray(usize),
    BadMode(usize, i32),
    NullSinkOrWindow(bool),
    TooManySegments(usize),
    NullOut,
}

fn layout_create(b: &mut Battery) {
    let fault = prop_oneof![
        4 => Just(CreateFault::None),
        1 => (0usize..4).prop_map(CreateFault::NullArray),
        1 => (0usize..9, prop_oneof![Just(i32::MIN), Just(-1), 2i32..100, Just(i32::MAX)])
            .prop_map(|(i, m)| CreateFault::BadMode(i, m)),
        1 => any::<bool>().prop_map(CreateFault::NullSinkOrWindow),
        1 => prop_oneof![Just(usize::MAX), (MAX_ROWS as usize + 1)..usize::MAX].prop_map(CreateFault::TooManySegments),
        1 => Just(CreateFault::NullOut),
    ];
    b.run("C headwise_layout_create", 4_000, (table(), layout_fault(), fault), |p, (mut t, rf, cf)| {
        let mut expect = apply(&mut t, &rf);
        let n = t.segs.len();
        let col = |f: fn(&Segment) -> u32| t.segs.iter().map(f).collect::<Vec<u32>>();
        let (offset, capacity, len, ring) =
            (col(|s| s.offset), col(|s| s.capacity), col(|s| s.len), col(|s| s.ring_head));
        let sink = col(|s| match s.mode {
            SegmentMode::Streaming { sink, .. } => sink,
            SegmentMode::Full => 0,
        });
        let window = col(|s| match s.mode {
            SegmentMode::Streaming { window, .. } => window,
            SegmentMode::Full => 0,
        });
        let mut mode: Vec<i32> = t
            .segs
            .iter()
            .map(|s| if s.mode == SegmentMode::Full { HEADWISE_MODE_FULL } else { HEADWISE_MODE_STREAMING })
            .collect();
        let mut num = n;
        let mut nulls = [false; 4];
        let (mut null_sink, mut null_window, mut null_out) = (false, false, false);
        match cf {
            CreateFault::None => {}
            CreateFault::NullArray(k) if n > 0 => {
                nulls[k] = true;
                expect = invalid(["offset", "capacity", "len", "mode"][k]);
            }
            CreateFault::BadMode(i, m) if n > 0 => {
                let i = i % n;
                mode[i] = m;
                // Earlier Streaming segments are converted first, then this one fails.
                expect = invalid(format!("mode[{i}]"));
            }
            CreateFault::NullSinkOrWindow(w) => {
                null_sink = !w;
                null_window = w;
                if let Some(i) = mode.iter().position(|&m| m == HEADWISE_MODE_STREAMING) {
                    let _ = i;
                    expect = invalid(if w { "window" } else { "sink" });
                }
            }
            CreateFault::TooManySegments(x) => {
                num = x;
                expect = invalid("num_segments");
            }
            CreateFault::NullOut => {
                null_out = true;
                expect = invalid("out");
            }
            _ => {}
        }
        let mut out = poison::<HeadwiseLayout>();
        let out_ptr: *mut *mut HeadwiseLayout = if null_out { null_mut() } else { &mut out };
        // SAFETY: every non-NULL array holds n elements; num != n only with a count the
        // call refuses before reading them.
        let ok = p.c_call(expect, || unsafe {
            headwise_layout_create(
                t.batch,
                t.kv_heads,
                t.total_rows,
                num,
                nul_or(&offset, nulls[0]),
                nul_or(&capacity, nulls[1]),
                nul_or(&len, nulls[2]),
                ring.as_ptr(),
                nul_or(&mode, nulls[3]),
                nul_or(&sink, null_sink),
                nul_or(&window, null_window),
                out_ptr,
            )
        })?;
        if null_out {
            return Ok(());
        }
        if ok {
            let mut rows = 0u64;
            // SAFETY: a live handle and a writable u64.
            check(unsafe { headwise_layout_total_rows(out, &mut rows) } == HEADWISE_OK, || "getter".into())?;
            check(rows == t.total_rows, || format!("total_rows {rows} != {}", t.total_rows))?;
        }
        check_out(ok, out, headwise_layout_free)
    });
}

#[derive(Clone, Debug)]
enum PackFault {
    None,
    BadMode(usize, i32),
    StreamingLen(usize, u32),
    NullSinkOrWindow(bool),
    NullModeOrLen(bool),
    TooManySegments(usize, usize),
    NullOut,
}

fn layout_pack(b: &mut Battery) {
    // Per segment: streaming, len, sink, window (window 0 and huge values included, for the
    // builder's own refusals).
    let spec = (
        prop::bool::weighted(0.4),
        prop_oneof![4 => 0u32..10, 1 => Just(u32::MAX - 3)],
        prop_oneof![4 => 0u32..4, 1 => Just(u32::MAX)],
        prop_oneof![4 => 1u32..6, 1 => Just(0u32)],
    );
    let grid = (1usize..=3, 1usize..=3)
        .prop_flat_map(move |(b, h)| (Just(b), Just(h), prop::collection::vec(spec.clone(), b * h)));
    let fault = prop_oneof![
        4 => Just(PackFault::None),
        1 => (0usize..9, prop_oneof![Just(i32::MIN), Just(-1), 2i32..100]).prop_map(|(i, m)| PackFault::BadMode(i, m)),
        1 => (0usize..9, 1u32..100).prop_map(|(i, l)| PackFault::StreamingLen(i, l)),
        1 => any::<bool>().prop_map(PackFault::NullSinkOrWindow),
        1 => any::<bool>().prop_map(PackFault::NullModeOrLen),
        1 => prop_oneof![
            (MAX_BUILDER_SEGMENTS + 1..usize::MAX).prop_map(|n| (n, 1)),
            (2usize..64).prop_map(|h| (usize::MAX / 2 + 1, h)),
        ]
        .prop_map(|(b, h)| PackFault::TooManySegments(b, h)),
        1 => Just(PackFault::NullOut),
    ];
    let headroom = prop_oneof![4 => 0u32..8, 1 => Just(u32::MAX)];
    b.run(
        "C headwise_layout_pack",
        3_000,
        (grid, headroom, fault),
        |p, ((batch, kv, specs), headroom, fault)| {
            let n = specs.len();
            let mut mode: Vec<i32> = specs
                .iter()
                .map(|s| if s.0 { HEADWISE_MODE_STREAMING } else { HEADWISE_MODE_FULL })
                .collect();
            let mut len: Vec<u32> = specs.iter().map(|s| if s.0 { 0 } else { s.1 }).collect();
            let sink: Vec<u32> = specs.iter().map(|s| s.2).collect();
            let window: Vec<u32> = specs.iter().map(|s| s.3).collect();
            let (mut batch, mut kv) = (batch, kv);
            let (mut null_mode, mut null_len, mut null_sink, mut null_window, mut null_out) =
                (false, false, false, false, false);
            let mut c_expect = None;
            match fault {
                PackFault::None => {}
                PackFault::BadMode(i, m) => {
                    let i = i % n;
                    mode[i] = m;
                    // Only the first fault in segment order is reported.
                    if !(0..i).any(|s| mode[s] == HEADWISE_MODE_STREAMING && len[s] != 0) {
                        c_expect = Some(invalid(format!("mode[{i}]")));
                    }
                }
                PackFault::StreamingLen(i, l) => {
                    let i = i % n;
                    (mode[i], len[i]) = (HEADWISE_MODE_STREAMING, l);
                    c_expect = Some(invalid(format!("len[{i}]")));
                }
                PackFault::NullSinkOrWindow(w) => {
                    (null_sink, null_window) = (!w, w);
                    if mode.contains(&HEADWISE_MODE_STREAMING) {
                        c_expect = Some(invalid(if w { "window" } else { "sink" }));
                    }
                }
                PackFault::NullModeOrLen(m) => (null_mode, null_len) = (m, !m),
                PackFault::TooManySegments(b2, h2) => {
                    (batch, kv) = (b2, h2);
                    c_expect = Some(invalid("batch * kv_heads"));
                }
                PackFault::NullOut => {
                    null_out = true;
                    c_expect = Some(invalid("out"));
                }
            }
            // The Rust builder on the same segments, as the C function reads them.
            let expect = c_expect.unwrap_or_else(|| {
                let mut builder = LayoutBuilder::new(batch, kv).headroom(headroom);
                for s in 0..n {
                    let l = if null_len { 0 } else { len[s] };
                    builder = match if null_mode { HEADWISE_MODE_FULL } else { mode[s] } {
                        HEADWISE_MODE_FULL => builder.full(s / kv, s % kv, l),
                        _ => builder.streaming(s / kv, s % kv, sink[s], window[s]),
                    };
                }
                expect_of(builder.build())
            });
            let mut out = poison::<HeadwiseLayout>();
            let out_ptr: *mut *mut HeadwiseLayout = if null_out { null_mut() } else { &mut out };
            // SAFETY: each non-NULL array holds batch * kv_heads elements, or the count is
            // refused before any is read.
            let ok = p.c_call(expect, || unsafe {
                headwise_layout_pack(
                    batch,
                    kv,
                    headroom,
                    nul_or(&mode, null_mode),
                    nul_or(&len, null_len),
                    nul_or(&sink, null_sink),
                    nul_or(&window, null_window),
                    out_ptr,
                )
            })?;
            if null_out {
                return Ok(());
            }
            check_out(ok, out, headwise_layout_free)
        },
    );
}

fn budget_uniform_c(b: &mut Battery) {
    let pair = prop_oneof![(any::<u32>(), any::<u32>()), (0u32..300, 0u32..300)];
    b.run("C headwise_budget_uniform", 1_000, (pair, prop::bool::weighted(0.1)), |p, ((c, w), null_out)| {
        let expect = if null_out { invalid("out") } else { expect_of(budget::uniform(c, w)) };
        let mut out = 0u32;
        let out_ptr: *mut u32 = if null_out { null_mut() } else { &mut out };
        // SAFETY: out is NULL or a writable u32.
        if p.c_call(expect, || unsafe { headwise_budget_uniform(c, w, out_ptr) })? {
            check(out == c, || format!("{out} != {c}"))?;
        }
        Ok(())
    });
}

fn budget_pyramid_c(b: &mut Battery) {
    let layers = prop_oneof![
        6 => 0usize..70,
        1 => prop_oneof![Just(usize::MAX), Just(1usize << 40), budget::MAX_LAYERS + 1..usize::MAX],
    ];
    let params = (0u32..300, 0u32..200, layers, 0u32..5000, 0u32..40);
    // 0: consistent, 1: out_len off by one or more, 2: NULL out.
    b.run(
        "C headwise_budget_pyramid",
        2_000,
        (params, 0u8..5, 1usize..4),
        |p, ((c, w, layers, q, beta), k, off)| {
            let huge = layers > budget::MAX_LAYERS;
            let (out_len, null_out) = match k {
                1 => (layers.wrapping_add(off), false),
                2 => (layers, true),
                _ if huge => (layers, true),
                _ => (layers, false),
            };
            let expect = if out_len != layers {
                invalid("out_len")
            } else if null_out && layers > 0 {
                invalid("out")
            } else {
                expect_of(budget::pyramid(c, w, layers, q, beta))
            };
            let mut out = vec![0u32; if huge || out_len != layers { 0 } else { out_len }];
            let out_ptr = if null_out { null_mut() } else { out.as_mut_ptr() };
            // SAFETY: out holds out_len elements, or is NULL, or out_len != layers is refused
            // before it is touched.
            let ok = p.c_call(expect, || unsafe {
                headwise_budget_pyramid(c, w, layers, q, beta, out_ptr, out_len)
            })?;
            if ok && !null_out {
                let want = budget::pyramid(c, w, layers, q, beta).unwrap();
                check(out == want, || format!("{out:?} != {want:?}"))?;
            }
            Ok(())
        },
    );
}

fn budget_headkv_c(b: &mut Battery) {
    let score = prop_oneof![8 => 0.0f32..10.0, 1 => prop::sample::select(vec![f32::NAN, f32::INFINITY, -1.0, 0.0, f32::MAX])];
    let imp = prop::collection::vec(score, 0..40);
    let float = |good: std::ops::Range<f32>| prop_oneof![8 => good, 1 => prop::sample::select(vec![f32::NAN, f32::INFINITY, 0.0, -1.0, 1e30])];
    let params =
        (imp, 0u32..64, prop_oneof![4 => 1u32..2000, 1 => Just(u32::MAX)], float(1.0..4.0), float(0.25..4.0));
    // 0..=2: consistent; 3: bad variant; 4: out_len off; 5: NULL importance; 6: NULL out.
    b.run(
        "C headwise_budget_headkv",
        3_000,
        (params, 0u8..7, prop_oneof![Just(-1), 2i32..50, Just(i32::MAX)], any::<bool>()),
        |p, ((imp, w, base, beta, temp), k, bad_variant, factory)| {
            let base = base.saturating_add(w);
            let n = imp.len();
            let good_variant = if factory { HEADWISE_HEADKV_KVCACHE_FACTORY } else { HEADWISE_HEADKV_REPO };
            let variant = if k == 3 { bad_variant } else { good_variant };
            let out_len = if k == 4 { n + 1 } else { n };
            let (null_imp, null_out) = (k == 5, k == 6);
            let o = HeadKvOptions {
                beta,
                temp,
                variant: if factory { HeadKvVariant::KvCacheFactory } else { HeadKvVariant::HeadKvRepo },
            };
            let expect = match k {
                3 => invalid("variant"),
                4 => invalid("out_len"),
                5 if n > 0 => invalid("importance"),
                6 if n > 0 => invalid("out"),
                _ => expect_of(budget::headkv(&imp, base, w, &o)),
            };
            let mut out = vec![0u32; n];
            let out_ptr = if null_out { null_mut() } else { out.as_mut_ptr() };
            // SAFETY: importance and out hold n elements or are NULL; out_len != n is
            // refused before either is read.
            let ok = p.c_call(expect, || unsafe {
                headwise_budget_headkv(
                    nul_or(&imp, null_imp),
                    n,
                    base,
                    w,
                    beta,
                    temp,
                    variant,
                    out_ptr,
                    out_len,
                )
            })?;
            if ok && n > 0 {
                let want = budget::headkv(&imp, base, w, &o).unwrap();
                check(out == want, || format!("{out:?} != {want:?}"))?;
            }
            Ok(())
        },
    );
}

/// What a text parser gets: valid text, a prefix of it, garbage, bytes that are not UTF-8,
/// a NULL text of non-zero length, or a NULL out-pointer.
#[derive(Clone, Debug)]
enum TextFault {
    None,
    Cut(usize),
    Garbage(String),
    NotUtf8(usize, u8),
    NullText(usize),
    NullOut,
}

fn text_fault(garbage: &'static str) -> impl Strategy<Value = TextFault> {
    prop_oneof![
        3 => Just(TextFault::None),
        3 => any::<usize>().prop_map(TextFault::Cut),
        2 => garbage.prop_map(TextFault::Garbage),
        1 => (any::<usize>(), 0x80u8..=0xff).prop_map(|(i, x)| TextFault::NotUtf8(i, x)),
        1 => (1usize..1000).prop_map(TextFault::NullText),
        1 => Just(TextFault::NullOut),
    ]
}

/// Applies `fault` to `text`: the bytes, whether text is NULL (and its length), whether
/// out is NULL, and the fault the C layer reports itself (else the Rust parser's).
fn apply_text(text: String, fault: &TextFault) -> (Vec<u8>, Option<usize>, bool, Option<Expect>) {
    match fault {
        TextFault::None => (text.into_bytes(), None, false, None),
        TextFault::Cut(at) => (text.as_bytes()[..at % (text.len() + 1)].to_vec(), None, false, None),
        TextFault::Garbage(g) => (g.clone().into_bytes(), None, false, None),
        TextFault::NotUtf8(i, x) => {
            let mut bytes = text.into_bytes();
            let i = i % (bytes.len() + 1);
            bytes.insert(i, *x);
            (bytes, None, false, Some(invalid("text")))
        }
        TextFault::NullText(n) => (Vec::new(), Some(*n), false, Some(invalid("text"))),
        TextFault::NullOut => (text.into_bytes(), None, true, Some(invalid("out"))),
    }
}

/// One text parser through the C ABI, expected to answer as its Rust parser does.
fn parse_case<H, T>(
    p: &Probe,
    text: String,
    fault: &TextFault,
    rust: impl Fn(&str) -> headwise::Result<T>,
    parse: unsafe extern "C" fn(*const c_char, usize, *mut *mut H) -> c_int,
    free: unsafe extern "C" fn(*mut H) -> c_int,
) -> Result<(), TestCaseError> {
    let (bytes, null_len, null_out, c_expect) = apply_text(text, fault);
    let expect = c_expect.unwrap_or_else(|| expect_of(rust(std::str::from_utf8(&bytes).unwrap())));
    let (ptr, len) = match null_len {
        Some(n) => (null(), n),
        None => (bytes.as_ptr().cast::<c_char>(), bytes.len()),
    };
    let mut out = poison::<H>();
    let out_ptr: *mut *mut H = if null_out { null_mut() } else { &mut out };
    // SAFETY: the text is NULL or holds len bytes; out is NULL or writable.
    let ok = p.c_call(expect, || unsafe { parse(ptr, len, out_ptr) })?;
    if null_out { Ok(()) } else { check_out(ok, out, free) }
}

fn gates_parse(b: &mut Battery) {
    let fault = text_fault("[0-9a-z.eE+ \t\r\n-]{0,40}");
    b.run("C headwise_head_gates_parse", 3_000, (tsv(), fault), |p, (tsv, fault)| {
        parse_case(
            p,
            tsv.render().0,
            &fault,
            HeadGates::parse_tsv,
            headwise_head_gates_parse,
            headwise_head_gates_free,
        )
    });
}

fn scores_parse(b: &mut Battery) {
    let fault = text_fault("[{}\\[\\]\"0-9, :.-]{0,40}");
    b.run("C headwise_head_scores_parse", 3_000, (scores(), fault), |p, (s, fault)| {
        let text = render_json(&s.entries());
        parse_case(
            p,
            text,
            &fault,
            HeadScores::parse_json,
            headwise_head_scores_parse,
            headwise_head_scores_free,
        )
    });
}

fn duo_config_c(b: &mut Battery) {
    let keys = ["sink_size", "recent_size", "deploy_sink_size", "deploy_recent_size"];
    let values = prop::collection::vec(config_value(), 4);
    let outs = prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)]; // 1: NULL sink, 2: NULL window
    let fault = text_fault("[{}\"a-z_0-9, :.-]{0,40}");
    b.run("C headwise_duo_attention_config", 2_000, (values, fault, outs), |p, (values, fault, outs)| {
        let fields: Vec<String> = keys
            .iter()
            .zip(&values)
            .filter_map(|(k, v)| match v {
                ConfigValue::Missing => None,
                ConfigValue::Null => Some(format!("\"{k}\": null")),
                ConfigValue::Count(n) => Some(format!("\"{k}\": {n}")),
                ConfigValue::Bad(t) => Some(format!("\"{k}\": {t}")),
            })
            .collect();
        let text = format!("{{{}}}", fields.join(", "));
        // A NULL `out` here means a NULL sink or window (the text fault's NullOut: sink).
        let (bytes, null_len, null_out, c_expect) = apply_text(text, &fault);
        let (null_sink, null_window) = (null_out || outs == 1, !null_out && outs == 2);
        let expect = if null_sink {
            invalid("sink")
        } else if null_window {
            invalid("window")
        } else {
            c_expect.unwrap_or_else(|| expect_of(duo_attention_config(std::str::from_utf8(&bytes).unwrap())))
        };
        let (ptr, len) = match null_len {
            Some(n) => (null(), n),
            None => (bytes.as_ptr().cast::<c_char>(), bytes.len()),
        };
        let (mut sink, mut window) = (u32::MAX, u32::MAX);
        let sp: *mut u32 = if null_sink { null_mut() } else { &mut sink };
        let wp: *mut u32 = if null_window { null_mut() } else { &mut window };
        // SAFETY: text NULL or len bytes; sink and window NULL or writable.
        if p.c_call(expect, || unsafe { headwise_duo_attention_config(ptr, len, sp, wp) })? {
            let want = duo_attention_config(std::str::from_utf8(&bytes).unwrap()).unwrap();
            check((sink, window) == (want.sink, want.window), || format!("{sink}/{window} != {want:?}"))?;
        }
        Ok(())
    });
}

const GATES_TSV: &str = "0.9\t0.1\t0.5\n0.5\t1.0\t0.0\n0.3\t0.7\t0.2\n";
const SCORES_JSON: &str =
    r#"{"0-0": [1], "0-1": [2], "0-2": [3], "0-3": [4], "1-0": [0.5], "1-1": [1], "1-2": [0], "1-3": [2]}"#;

fn gates_select(b: &mut Battery) {
    let mut g = null_mut();
    // SAFETY: valid text of that length; g writable.
    let made = unsafe { headwise_head_gates_parse(GATES_TSV.as_ptr().cast(), GATES_TSV.len(), &mut g) };
    assert_eq!(made, HEADWISE_OK);
    let rust = gates();
    let sparsity = prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-f64::MIN_POSITIVE),
        Just(1.0 + f64::EPSILON),
        -1e300f64..0.0,
        1.0f64..1e300,
        0.0f64..=1.0,
    ];
    // 0..=2: consistent; 3: mask_len off; 4: NULL mask; 5: NULL gates.
    b.run("C headwise_head_gates_select_full", 2_000, (sparsity, 0u8..6, 1usize..20), |p, (s, k, off)| {
        let n = rust.layers() * rust.kv_heads();
        let mask_len = if k == 3 { if off % 2 == 0 { n + off } else { n.saturating_sub(off) } } else { n };
        let expect = match k {
            5 => invalid("gates"),
            3 => invalid("mask_len"),
            4 => invalid("mask"),
            _ => expect_of(rust.select_full(s)),
        };
        let mut mask = vec![9u8; n];
        let mp = if k == 4 { null_mut() } else { mask.as_mut_ptr() };
        let gp = if k == 5 { null() } else { g.cast_const() };
        // SAFETY: gates NULL or live; mask NULL or n bytes; mask_len != n is refused first.
        if p.c_call(expect, || unsafe { headwise_head_gates_select_full(gp, s, mp, mask_len) })? {
            let full = rust.select_full(s).unwrap();
            let want: Vec<u8> =
                (0..n).map(|i| u8::from(full.is_full(i / rust.kv_heads(), i % rust.kv_heads()))).collect();
            check(mask == want, || format!("mask {mask:?} != {want:?}"))?;
        }
        Ok(())
    });
    // SAFETY: made above, freed once.
    assert_eq!(unsafe { headwise_head_gates_free(g) }, HEADWISE_OK);
}

/// The GPU side without a usable GPU (`headwise_gpu_create` must answer NO_GPU or
/// NO_KERNELS for a device no machine has), every function that takes a handle given NULL,
/// out-pointers given NULL, and the handle accessors' length checks on live host handles.
fn gpu_side(b: &mut Battery) {
    let (mut layout, mut gates, mut scores) = (null_mut(), null_mut(), null_mut());
    // SAFETY: valid arrays/text of the given lengths; the outs are writable.
    unsafe {
        assert_eq!(headwise_layout_pack(2, 2, 4, null(), null(), null(), null(), &mut layout), HEADWISE_OK);
        assert_eq!(
            headwise_head_gates_parse(GATES_TSV.as_ptr().cast(), GATES_TSV.len(), &mut gates),
            HEADWISE_OK
        );
        assert_eq!(
            headwise_head_scores_parse(SCORES_JSON.as_ptr().cast(), SCORES_JSON.len(), &mut scores),
            HEADWISE_OK
        );
    }
    let rust_scores = HeadScores::parse_json(SCORES_JSON).unwrap();
    let (layout, gates, scores) = (layout, gates, scores);
    type Case = fn(
        usize,
        usize,
        *mut HeadwiseLayout,
        *mut HeadwiseHeadGates,
        *mut HeadwiseHeadScores,
    ) -> (Expect, c_int);
    // Each case gets two random numbers (x, y) for its sizes and codes.
    // SAFETY (every case): NULL handles, or the live handles above with in-range writes.
    let cases: Vec<(&str, Case)> = vec![
        ("gpu_create device<0", |x, _, _, _, _| {
            let mut out = poison();
            let code =
                unsafe { headwise_gpu_create(-1 - (x % (i32::MAX as usize)) as i32, null_mut(), &mut out) };
            (if out.is_null() { invalid("device") } else { invalid("out left non-NULL") }, code)
        }),
        ("gpu_create absent device", |x, _, _, _, _| {
            let mut out = poison();
            let device = (1 << 20) + (x % (i32::MAX as usize - (1 << 20))) as i32;
            let code = unsafe { headwise_gpu_create(device, null_mut(), &mut out) };
            (if out.is_null() { Expect::NoDevice } else { invalid("out left non-NULL") }, code)
        }),
        ("gpu_create out NULL", |_, _, _, _, _| {
            (invalid("out"), unsafe { headwise_gpu_create(0, null_mut(), null_mut()) })
        }),
        ("gpu_kernels_built out NULL", |_, _, _, _, _| {
            (invalid("out"), unsafe { headwise_gpu_kernels_built(null_mut()) })
        }),
        ("store_synchronize", |_, _, _, _, _| {
            (invalid("store"), unsafe { headwise_store_synchronize(null()) })
        }),
        ("store_free NULL", |_, _, _, _, _| (Expect::Ok, unsafe { headwise_store_free(null_mut()) })),
        ("emulator_create out NULL", |_, _, _, _, _| {
            (invalid("out"), unsafe { headwise_emulator_create(null_mut()) })
        }),
        ("cache_create", |x, y, l, _, _| {
            let mut out = poison();
            let code = unsafe {
                headwise_cache_create(null(), l, (x % 3) as c_int, y % 300, null_mut(), null_mut(), &mut out)
            };
            (if out.is_null() { invalid("store") } else { invalid("out left non-NULL") }, code)
        }),
        ("cache_create out NULL", |_, _, l, _, _| {
            (invalid("out"), unsafe {
                headwise_cache_create(null(), l, 0, 128, null_mut(), null_mut(), null_mut())
            })
        }),
        ("cache_free NULL", |_, _, _, _, _| (Expect::Ok, unsafe { headwise_cache_free(null_mut()) })),
        ("cache_layout", |_, _, _, _, _| {
            let mut out = poison();
            let code = unsafe { headwise_cache_layout(null(), &mut out) };
            (if out.is_null() { invalid("cache") } else { invalid("out left non-NULL") }, code)
        }),
        ("cache_append", |_, _, _, _, _| {
            (invalid("cache"), unsafe { headwise_cache_append(null_mut(), null(), null()) })
        }),
        ("cache_append_tokens", |x, _, _, _, _| {
            (invalid("cache"), unsafe { headwise_cache_append_tokens(null_mut(), null(), null(), x % 9) })
        }),
        ("cache_attention_chunk", |x, y, _, _, _| {
            let code = unsafe {
                headwise_cache_attention_chunk(
                    null_mut(),
                    null(),
                    x % 70,
                    y % 9,
                    null_mut(),
                    null_mut(),
                    0.0,
                    0,
                )
            };
            (invalid("cache"), code)
        }),
        ("cache_rollback", |x, _, _, _, _| {
            let counts = [1u32; 4];
            (invalid("cache"), unsafe { headwise_cache_rollback(null_mut(), counts.as_ptr(), x % 5) })
        }),
        ("cache_attention", |x, y, _, _, _| {
            let code = unsafe {
                headwise_cache_attention(null_mut(), null(), x % 9, null_mut(), null_mut(), 0.125, y as u32)
            };
            (invalid("cache"), code)
        }),
        ("cache_compress_into", |x, _, _, _, _| {
            let budgets = [7u32; 4];
            let code =
                unsafe { headwise_cache_compress_into(null_mut(), null(), null(), budgets.as_ptr(), x % 5) };
            (invalid("cache"), code)
        }),
        ("cache_compress_into_scored", |x, y, _, _, _| {
            let (budgets, scores) = ([7u32; 4], [0.5f32; 8]);
            let code = unsafe {
                headwise_cache_compress_into_scored(
                    null_mut(),
                    null(),
                    null(),
                    scores.as_ptr(),
                    y % 9,
                    budgets.as_ptr(),
                    x % 5,
                )
            };
            (invalid("cache"), code)
        }),
        ("cache_expected_attention_scores", |x, y, _, _, _| {
            let (mean, out) = ([0.5f32; 8], [0.0f32; 8]);
            let code = unsafe {
                headwise_cache_expected_attention_scores(
                    null_mut(),
                    null(),
                    mean.as_ptr(),
                    x % 9,
                    null(),
                    0,
                    (y % 5) as u32,
                    null(),
                    out.as_ptr().cast_mut(),
                    y % 9,
                )
            };
            (invalid("cache"), code)
        }),
        ("cache_attention_with_mass", |x, y, _, _, _| {
            let code = unsafe {
                headwise_cache_attention_with_mass(
                    null_mut(),
                    null(),
                    x % 17,
                    null_mut(),
                    null_mut(),
                    0.0,
                    0,
                    null_mut(),
                    y % 9,
                )
            };
            (invalid("cache"), code)
        }),
        ("cache_evict_by_mass", |x, y, _, _, _| {
            let code = unsafe {
                headwise_cache_evict_by_mass(null_mut(), null_mut(), x % 9, (y % 20) as u32, 0, null_mut(), 0)
            };
            (invalid("cache"), code)
        }),
        ("cache_compress_into_adakv", |x, _, _, _, _| {
            (invalid("cache"), unsafe {
                headwise_cache_compress_into_adakv(null_mut(), null(), null(), x as u32, 0.2)
            })
        }),
        ("cache_relayout_into", |_, _, l, _, _| {
            (invalid("cache"), unsafe { headwise_cache_relayout_into(null(), l, null_mut(), null_mut()) })
        }),
        ("cache_evict", |x, _, _, _, _| {
            let code =
                unsafe { headwise_cache_evict(null_mut(), null(), x % 9, null(), null(), 0, null_mut(), 0) };
            (invalid("cache"), code)
        }),
        ("query_ring_create", |x, y, _, _, _| {
            let mut out = poison();
            let code = unsafe {
                headwise_query_ring_create(null(), (x % 3) as c_int, y % 64, x % 17, 128, &mut out)
            };
            (if out.is_null() { invalid("store") } else { invalid("out left non-NULL") }, code)
        }),
        ("query_ring_create out NULL", |_, _, _, _, _| {
            (invalid("out"), unsafe { headwise_query_ring_create(null(), 0, 8, 8, 128, null_mut()) })
        }),
        ("query_ring_push", |_, _, _, _, _| {
            (invalid("ring"), unsafe { headwise_query_ring_push(null_mut(), null()) })
        }),
        ("query_ring_free NULL", |_, _, _, _, _| {
            (Expect::Ok, unsafe { headwise_query_ring_free(null_mut()) })
        }),
        ("select_options_default", |_, _, _, _, _| {
            (invalid("out"), unsafe { headwise_select_options_default(null_mut()) })
        }),
        ("rkv_options_default", |x, _, _, _, _| {
            (invalid("out"), unsafe { headwise_rkv_options_default(x as u32, null_mut()) })
        }),
        ("layout getters NULL layout", |x, _, _, _, _| {
            let (mut u, mut r) = (0usize, 0u64);
            let code = unsafe {
                match x % 7 {
                    0 => headwise_layout_batch(null(), &mut u),
                    1 => headwise_layout_kv_heads(null(), &mut u),
                    2 => headwise_layout_num_segments(null(), &mut u),
                    3 => headwise_layout_total_rows(null(), &mut r),
                    4 => headwise_layout_rows_in_use(null(), &mut r),
                    5 => headwise_layout_device_table_len(null(), &mut u),
                    _ => headwise_layout_check_appendable(null()),
                }
            };
            (invalid("layout"), code)
        }),
        ("layout getters NULL out", |x, _, l, _, _| {
            let code = unsafe {
                match x % 6 {
                    0 => headwise_layout_batch(l, null_mut()),
                    1 => headwise_layout_kv_heads(l, null_mut()),
                    2 => headwise_layout_num_segments(l, null_mut()),
                    3 => headwise_layout_total_rows(l, null_mut()),
                    4 => headwise_layout_rows_in_use(l, null_mut()),
                    _ => headwise_layout_device_table_len(l, null_mut()),
                }
            };
            (invalid("out"), code)
        }),
        ("layout clone/regrown NULL", |x, y, _, _, _| {
            let mut out = poison();
            let code = unsafe {
                if x % 2 == 0 {
                    headwise_layout_clone(null(), &mut out)
                } else {
                    headwise_layout_regrown(null(), y as u32, &mut out)
                }
            };
            (if out.is_null() { invalid("layout") } else { invalid("out left non-NULL") }, code)
        }),
        ("layout_segments", |x, _, l, _, _| {
            // The layout has 4 segments.
            let n = if x % 2 == 0 { 0 } else { 5 + x % 100 };
            let mut buf = vec![0u32; 4];
            let code = unsafe {
                headwise_layout_segments(
                    l,
                    n,
                    buf.as_mut_ptr(),
                    null_mut(),
                    null_mut(),
                    null_mut(),
                    null_mut(),
                    null_mut(),
                    null_mut(),
                )
            };
            (invalid("num_segments"), code)
        }),
        ("layout_segments NULL layout", |_, _, _, _, _| {
            let code = unsafe {
                headwise_layout_segments(
                    null(),
                    4,
                    null_mut(),
                    null_mut(),
                    null_mut(),
                    null_mut(),
                    null_mut(),
                    null_mut(),
                    null_mut(),
                )
            };
            (invalid("layout"), code)
        }),
        ("layout_device_table", |x, _, l, _, _| {
            // 6 fields * 4 segments = 24 entries.
            let mut buf = vec![0i32; 24];
            let len = if x % 2 == 0 { x % 24 } else { 25 + x % 100 };
            let ptr = if len <= 24 { buf.as_mut_ptr() } else { null_mut() };
            (invalid("len"), unsafe { headwise_layout_device_table(l, ptr, len) })
        }),
        ("layout_device_table NULL out", |_, _, l, _, _| {
            (invalid("out"), unsafe { headwise_layout_device_table(l, null_mut(), 24) })
        }),
        ("head_gates_shape/values NULL", |x, _, _, _, _| {
            let mut u = 0usize;
            let mut v = [0f64; 9];
            let code = unsafe {
                if x % 2 == 0 {
                    headwise_head_gates_shape(null(), &mut u, &mut u)
                } else {
                    headwise_head_gates_values(null(), v.as_mut_ptr(), 9)
                }
            };
            (invalid("gates"), code)
        }),
        ("head_gates_values len", |x, _, _, g, _| {
            let mut v = [0f64; 9];
            let len = if x % 2 == 0 { x % 9 } else { 10 + x % 1000 };
            let ptr = if len <= 9 { v.as_mut_ptr() } else { null_mut() };
            (invalid("len"), unsafe { headwise_head_gates_values(g, ptr, len) })
        }),
        ("head_gates_values NULL out", |_, _, _, g, _| {
            (invalid("out"), unsafe { headwise_head_gates_values(g, null_mut(), 9) })
        }),
        ("head_scores accessors NULL", |x, _, _, _, _| {
            let mut u = 0usize;
            let mut v = [0f32; 8];
            let mut out = poison();
            let code = unsafe {
                match x % 3 {
                    0 => headwise_head_scores_shape(null(), &mut u, &mut u),
                    1 => headwise_head_scores_importance(null(), v.as_mut_ptr(), 8),
                    _ => headwise_head_scores_to_kv_heads(null(), 2, &mut out),
                }
            };
            (if out.is_null() || x % 3 != 2 { invalid("scores") } else { invalid("out left non-NULL") }, code)
        }),
        ("head_scores_importance len", |x, _, _, _, s| {
            let mut v = [0f32; 8];
            let len = if x % 2 == 0 { x % 8 } else { 9 + x % 1000 };
            let ptr = if len <= 8 { v.as_mut_ptr() } else { null_mut() };
            (invalid("len"), unsafe { headwise_head_scores_importance(s, ptr, len) })
        }),
    ];
    let n = cases.len();
    b.run(
        "C GPU side, NULL handles, accessors",
        3_000,
        (0..n, any::<usize>(), any::<usize>()),
        |p, (i, x, y)| {
            let (expect, code) = (cases[i].1)(x, y, layout, gates, scores);
            p.c_call(expect, || code).map_err(|e| TestCaseError::fail(format!("{}: {e}", cases[i].0)))?;
            Ok(())
        },
    );
    // to_kv_heads on a live table: as the Rust call answers.
    b.run("C headwise_head_scores_to_kv_heads", 500, (0usize..12, any::<bool>()), |p, (kv, null_out)| {
        let expect = if null_out { invalid("out") } else { expect_of(rust_scores.to_kv_heads(kv)) };
        let mut out = poison::<HeadwiseHeadScores>();
        let out_ptr: *mut *mut HeadwiseHeadScores = if null_out { null_mut() } else { &mut out };
        // SAFETY: a live handle; out NULL or writable.
        let ok = p.c_call(expect, || unsafe { headwise_head_scores_to_kv_heads(scores, kv, out_ptr) })?;
        if null_out { Ok(()) } else { check_out(ok, out, headwise_head_scores_free) }
    });
    // SAFETY: made above, freed once each.
    unsafe {
        assert_eq!(headwise_layout_free(layout), HEADWISE_OK);
        assert_eq!(headwise_head_gates_free(gates), HEADWISE_OK);
        assert_eq!(headwise_head_scores_free(scores), HEADWISE_OK);
    }
}
