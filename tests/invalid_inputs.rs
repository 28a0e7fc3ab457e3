//! Invalid-input battery (issue 8): every public entry point is driven with invalid inputs and
//! must return the typed error that names the argument at fault, never panic (each call runs
//! under `catch_unwind`), and never launch a kernel on the way to an error (the cache entry
//! points run on `Counting`, an emulator store that counts launches). One test runs it all and
//! prints a table of cases / errors / ok controls / panics / launches per entry point
//! (`cargo test --test invalid_inputs -- --nocapture`); it asserts no failure, no panic and at
//! least 100k cases. `HEADWISE_BIG_SWEEPS=1` runs ten times as many.
//!
//! The C ABI is covered too (rows named `C ...`; built only with `--features capi`, which CI's
//! battery step passes): the `extern "C"` functions are called directly with NULL pointers,
//! lengths that disagree with their arrays, unknown enum codes, text that is not UTF-8, and
//! (through the generators above) the faults the Rust API refuses, expecting the Rust call's
//! answer on the same input. Each C call must return the expected code (never
//! `HEADWISE_ERROR_PANIC`, counted as a panic), `headwise_last_error_code` must agree, the last
//! error message must be non-empty and start `invalid FIELD:` for the field at fault, a failed
//! call must leave its handle out-pointer NULL, and every handle made is freed. The GPU side
//! runs with NULL handles and a device no machine has (NO_GPU or NO_KERNELS).
//!
//! Adding an entry point (a new operation, ...):
//! 1. write `fn my_entry(b: &mut Battery)` that calls `b.run("name", cases, strategy, |p, input|
//!    ...)`: generate an input with exactly one known fault (or a valid control), then
//!    `p.call(Expect::Invalid(field), || the_call(...))?` for each call it makes. `Expect` says
//!    what must come back (`Invalid` with that exact field, `InvalidWhere` for inputs where any
//!    of several real faults may be reported, `SegmentFull`, `Ok` for controls). Calls that
//!    launch kernels go through `Counting` so an error after a launch is caught; keep launching
//!    controls few (`b.controls`), since kernels are slow in the emulator;
//! 2. list the function in `ENTRY_POINTS` (a C ABI function: in `c::ENTRY_POINTS`, checking each
//!    call with `p.c_call(expect, || unsafe { headwise_...(...) })`, which returns whether it
//!    succeeded; `c::expect_of` turns the Rust call's result into the expectation).
//!
//! Not constructible here: misaligned buffers (`EmuBuf` is always 256-byte aligned; misaligned
//! engine memory enters only through the `unsafe` `GpuBuf::borrowed`), and buffers of another
//! device (the GPU store's check, `Store::check_buf`, needs two GPUs). Not driven: the CPU
//! oracle in `reference` (test support with documented shape preconditions) and accessors that
//! index like a slice (`LayerLayout::segment`, `HeadGates::gate`, `Segment::row`, ...). Not
//! refusable before a launch, by design: AdaKV counts, known only after scoring, that overflow a
//! `compress_into` destination or (above the window per row) the headroom. Not driven: an R-KV
//! segment past the 65535 * 32 tokens a step supports (it needs a cache of hundreds of MB).
#![cfg(feature = "emulator")]

#[path = "invalid_inputs/chunk.rs"]
mod chunk;

use half::bf16;
#[cfg(feature = "cuda")]
use headwise::GpuStore;
use headwise::attention::{AttentionOptions, AttentionWorkspace, MAX_GROUP, MAX_SPLITS};
use headwise::dtype::{SUPPORTED_HEAD_DIMS, check_head_dim};
use headwise::heavy_hitters::{H2oOptions, H2oWorkspace, evict_by_mass};
use headwise::layout::{LayerLayout, LayoutBuilder, MAX_BUILDER_SEGMENTS, MAX_ROWS, Segment, SegmentMode};
use headwise::params::HwLaunch;
use headwise::policy::budget::{self, HeadKvOptions, HeadKvVariant};
use headwise::policy::head_scores::HeadScores;
use headwise::policy::heads::{FullHeads, HeadGates, MAX_HEADS, StreamingSize, duo_attention_config};
use headwise::redundancy::{
    MAX_ALPHA, MAX_GROUP as MAX_RKV_GROUP, QueryRing, RkvOptions, RkvTrigger, RkvWorkspace, evict,
};
use headwise::select::{
    Budgets, GqaReduce, Granularity, MAX_GROUP as MAX_SELECT_GROUP, Pool, Prompt, Score, SelectOptions,
    SelectWorkspace, compress, compress_into, compress_into_scored,
};
use headwise::store::{Elem, KernelParams};
use headwise::{EmuBuf, EmuStore, Error, LayerCache, Store};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;
use std::time::Instant;

const ENTRY_POINTS: &[fn(&mut Battery)] = &[
    layout_new,
    layout_builder,
    layout_regrown,
    gates_parse_tsv,
    gates_select_full,
    full_heads_layer_layout,
    full_heads_all_full,
    duo_config,
    head_scores_parse_json,
    head_scores_to_kv_heads,
    budget_uniform,
    budget_pyramid,
    budget_headkv,
    head_dim_check,
    cache_new,
    cache_from_parts,
    cache_append,
    cache_regrow,
    cache_relayout_into,
    cache_attention,
    cache_attention_with_mass,
    chunk::cache_append_tokens,
    chunk::cache_attention_chunk,
    chunk::cache_rollback,
    emu_store,
    #[cfg(feature = "cuda")]
    gpu_store_new,
    select_compress,
    select_compress_into,
    select_compress_into_scored,
    select_compress_packed,
    select_sinks_threshold,
    scores_expected_attention,
    rkv_evict,
    h2o_evict_by_mass,
    query_ring_new,
    query_ring_push,
    c_abi,
];

#[test]
fn invalid_inputs_battery() {
    let start = Instant::now();
    let mut battery = Battery::default();
    for entry in ENTRY_POINTS {
        entry(&mut battery);
    }
    battery.report(start.elapsed().as_secs_f64());
}

/// The library bugs this battery found, as fixed cases (the battery draws them at random).
#[test]
fn library_bugs_found_by_the_battery() {
    let field = |r: Result<(), Error>| match r {
        Err(Error::Invalid { field, .. }) => field,
        other => panic!("expected Error::Invalid, got {other:?}"),
    };
    // A key index near usize::MAX overflowed the grid size (a panic in debug builds).
    let text = r#"{"0-0": [1], "18446744073709551615-0": [1]}"#;
    assert_eq!(field(HeadScores::parse_json(text).map(drop)), r#"head scores key "18446744073709551615-0""#);
    // HeadKV: a budget plus a window near u32::MAX overflowed (a panic in debug builds).
    let factory = HeadKvOptions { variant: HeadKvVariant::KvCacheFactory, ..Default::default() };
    assert_eq!(field(budget::headkv(&[1.0, 2.0], 12, u32::MAX, &factory).map(drop)), "window");
    // HeadKV: scores summing past f32::MAX gave every head the floor (factory) or blamed
    // base_capacity; a temp that underflows every share also blamed base_capacity.
    let repo = HeadKvOptions::default();
    for o in [&repo, &factory] {
        assert_eq!(field(budget::headkv(&[f32::MAX, f32::MAX], 100, 8, o).map(drop)), "importance");
    }
    let sharp = HeadKvOptions { temp: 1e30, ..Default::default() };
    assert_eq!(field(budget::headkv(&[1.0, 1.0], 100, 8, &sharp).map(drop)), "temp");
    // PyramidKV: an absurd layer count allocated its budget list (capacity overflow panic, or an
    // allocation failure that aborts the process).
    for layers in [usize::MAX, 1 << 40, budget::MAX_LAYERS + 1] {
        assert_eq!(field(budget::pyramid(100, 8, layers, 50, 20).map(drop)), "layers");
    }
    assert_eq!(budget::pyramid(100, 8, budget::MAX_LAYERS, 50, 20).unwrap().len(), budget::MAX_LAYERS);
    // all_full multiplied layers * kv_heads unchecked (overflow panic) and allocated the product.
    assert_eq!(field(FullHeads::all_full(usize::MAX, 2).map(drop)), "layers * kv_heads");
    assert_eq!(field(FullHeads::all_full(1 << 40, 1).map(drop)), "layers * kv_heads");
    assert_eq!(FullHeads::all_full(2, 3).unwrap().count_full(), 6);
    // config.json: a bad deploy_* value was reported under the training key's name.
    let text = r#"{"sink_size": 4, "recent_size": 8, "deploy_recent_size": 0}"#;
    assert_eq!(field(duo_attention_config(text).map(drop)), "config.json deploy_recent_size");
    let text = r#"{"sink_size": 4, "recent_size": 8, "deploy_sink_size": -1}"#;
    assert_eq!(field(duo_attention_config(text).map(drop)), "config.json deploy_sink_size");
    assert_eq!(field(duo_attention_config(r#"{"sink_size": 4}"#).map(drop)), "config.json recent_size");
    // select::compress: a headroom that overflows the compressed layer was reported only after
    // the scoring kernels had run (5 launches); it is now refused before any.
    let s = Counting(Rc::new(Cell::new(0)));
    let (k, queries) = (s.zeros::<bf16>(8 * 64).unwrap(), s.zeros::<bf16>(2 * 64).unwrap());
    let prompt = Prompt::<Counting, bf16> {
        k: &k,
        v: &k,
        queries: &queries,
        batch: 1,
        kv_heads: 1,
        group_size: 1,
        q_len: 8,
        head_dim: 64,
        packing: Default::default(),
    };
    let opts = SelectOptions { window: 2, pool_kernel: 1, headroom: u32::MAX, ..SelectOptions::default() };
    for budgets in [Budgets::PerRow(&[4]), Budgets::AdaKv { base: 4, floor_alpha: 0.2 }] {
        let r = compress(&s, &prompt, budgets, &opts, &mut SelectWorkspace::new());
        assert_eq!(field(r.map(drop)), "headroom");
    }
    assert_eq!(s.0.get(), 0, "launched before refusing the headroom");
    // redundancy::evict: an odd kernel above int32 was reported as "budget".
    let layout = LayoutBuilder::new(1, 1).full(0, 0, 4).build().unwrap();
    let mut cache = LayerCache::<_, bf16>::new(&s, layout, 64).unwrap();
    let ring = QueryRing::<_, bf16>::new(&s, 1, 2, 64).unwrap();
    let opts = RkvOptions { alpha: 2, kernel: usize::MAX, ..RkvOptions::new(3) };
    let r = evict(&mut cache, &ring, 1, &opts, RkvTrigger::Threshold, &mut RkvWorkspace::new());
    assert_eq!(field(r.map(drop)), "kernel");
}

// ---------------------------------------------------------------------------------------------
// The harness.

/// What one call must return.
#[derive(Clone)]
enum Expect {
    /// `Error::Invalid` naming exactly this field.
    Invalid(String),
    /// `Error::Invalid` whose field the predicate confirms is really at fault (inputs with
    /// several faults, any of which may be reported first).
    InvalidWhere(&'static str, Rc<dyn Fn(&str) -> bool>),
    /// `Error::SegmentFull` naming this segment.
    SegmentFull(usize),
    /// `Error::NoGpu` or `Error::NoKernels`.
    NoDevice,
    /// A valid control: must succeed.
    Ok,
}

fn invalid(field: impl Into<String>) -> Expect {
    Expect::Invalid(field.into())
}

impl std::fmt::Debug for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Invalid(field) => write!(f, "Invalid({field:?})"),
            Expect::InvalidWhere(what, _) => write!(f, "Invalid(field where {what})"),
            Expect::SegmentFull(s) => write!(f, "SegmentFull({s})"),
            Expect::NoDevice => write!(f, "NoGpu or NoKernels"),
            Expect::Ok => write!(f, "Ok"),
        }
    }
}

#[derive(Default)]
struct Tally {
    cases: u64,
    errors: u64,
    oks: u64,
    panics: u64,
    launches: u64,
    seconds: f64,
    failure: Option<String>,
}

/// Runs calls of one entry point and tallies them.
struct Probe<'a> {
    tally: &'a RefCell<Tally>,
    launches: Rc<Cell<u64>>,
}

impl Probe<'_> {
    /// Runs `f` once: it must not panic, must return what `expect` says, and must not have
    /// launched anything if it failed.
    fn call<T>(
        &self,
        expect: Expect,
        f: impl FnOnce() -> headwise::Result<T>,
    ) -> Result<Option<T>, TestCaseError> {
        let before = self.launches.get();
        let got = catch_unwind(AssertUnwindSafe(f));
        let launched = self.launches.get() - before;
        let mut t = self.tally.borrow_mut();
        t.cases += 1;
        t.launches += launched;
        let got = match got {
            Ok(r) => r,
            Err(panic) => {
                t.panics += 1;
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                return Err(TestCaseError::fail(format!("panicked ({msg}); expected {expect:?}")));
            }
        };
        let e = match got {
            Ok(v) => {
                t.oks += 1;
                return match expect {
                    Expect::Ok => Ok(Some(v)),
                    _ => Err(TestCaseError::fail(format!("returned Ok; expected {expect:?}"))),
                };
            }
            Err(e) => e,
        };
        t.errors += 1;
        if launched > 0 {
            return Err(TestCaseError::fail(format!("{e} came after {launched} launch(es)")));
        }
        let ok = match (&expect, &e) {
            (Expect::Invalid(want), Error::Invalid { field, reason }) => field == want && !reason.is_empty(),
            (Expect::InvalidWhere(_, real), Error::Invalid { field, reason }) => {
                real(field) && !reason.is_empty()
            }
            (Expect::SegmentFull(want), Error::SegmentFull { segment, .. }) => segment == want,
            (Expect::NoDevice, Error::NoGpu(_) | Error::NoKernels) => true,
            _ => false,
        };
        if ok { Ok(None) } else { Err(TestCaseError::fail(format!("got {e:?}; expected {expect:?}"))) }
    }
}

#[derive(Default)]
struct Battery {
    entries: Vec<(&'static str, Tally)>,
    launches: Rc<Cell<u64>>,
}

impl Battery {
    fn scale() -> u32 {
        if std::env::var("HEADWISE_BIG_SWEEPS").is_ok_and(|v| v == "1") { 10 } else { 1 }
    }

    fn tally(&mut self, name: &'static str) -> &mut Tally {
        if let Some(i) = self.entries.iter().position(|(n, _)| *n == name) {
            return &mut self.entries[i].1;
        }
        self.entries.push((name, Tally::default()));
        &mut self.entries.last_mut().unwrap().1
    }

    /// `cases` generated inputs (times the sweep scale) through `test`; the first failure is
    /// shrunk by proptest and recorded against `name`.
    fn run<S: Strategy>(
        &mut self,
        name: &'static str,
        cases: u32,
        strategy: S,
        test: impl Fn(&Probe, S::Value) -> Result<(), TestCaseError>,
    ) {
        let config = Config { cases: cases * Self::scale(), failure_persistence: None, ..Config::default() };
        self.with_probe(name, |probe| {
            TestRunner::new(config).run(&strategy, |v| test(probe, v)).err().map(|e| e.to_string())
        });
    }

    /// Fixed cases (launching controls, one-off edges) counted against `name`.
    fn controls(&mut self, name: &'static str, test: impl FnOnce(&Probe) -> Result<(), TestCaseError>) {
        self.with_probe(name, |probe| test(probe).err().map(|e| format!("control: {e}")));
    }

    fn with_probe(&mut self, name: &'static str, f: impl FnOnce(&Probe) -> Option<String>) {
        let cell = RefCell::new(Tally::default());
        let start = Instant::now();
        let failure = f(&Probe { tally: &cell, launches: self.launches.clone() });
        let add = cell.into_inner();
        let seconds = start.elapsed().as_secs_f64();
        let t = self.tally(name);
        t.cases += add.cases;
        t.errors += add.errors;
        t.oks += add.oks;
        t.panics += add.panics;
        t.launches += add.launches;
        t.seconds += seconds;
        if t.failure.is_none() {
            t.failure = failure;
        }
    }

    fn report(&self, seconds: f64) {
        let sum = |f: fn(&Tally) -> u64| self.entries.iter().map(|(_, t)| f(t)).sum::<u64>();
        let mut out = format!(
            "\ninvalid-input battery: {} entry points, {seconds:.1} s\n{:<34}{:>9}{:>9}{:>8}{:>8}{:>10}{:>8}\n",
            self.entries.len(),
            "entry point",
            "cases",
            "errors",
            "ok",
            "panics",
            "launches",
            "s"
        );
        for (name, t) in &self.entries {
            out += &format!(
                "{name:<34}{:>9}{:>9}{:>8}{:>8}{:>10}{:>8.2}{}\n",
                t.cases,
                t.errors,
                t.oks,
                t.panics,
                t.launches,
                t.seconds,
                if t.failure.is_some() { "  FAILED" } else { "" }
            );
        }
        let (cases, panics) = (sum(|t| t.cases), sum(|t| t.panics));
        out += &format!(
            "{:<34}{cases:>9}{:>9}{:>8}{panics:>8}{:>10}{seconds:>8.2}\n",
            "total",
            sum(|t| t.errors),
            sum(|t| t.oks),
            sum(|t| t.launches)
        );
        eprintln!("{out}");
        let failures: Vec<String> = self
            .entries
            .iter()
            .filter_map(|(n, t)| t.failure.as_ref().map(|f| format!("{n}: {f}")))
            .collect();
        assert!(failures.is_empty(), "{} entry point(s) failed:\n{}", failures.len(), failures.join("\n"));
        assert_eq!(panics, 0);
        assert!(cases >= 100_000, "only {cases} cases");
    }
}

/// The emulator store, counting launches so the battery can tell that no error came after one.
#[derive(Clone)]
struct Counting(Rc<Cell<u64>>);

static EMU: EmuStore = EmuStore;

impl Store for Counting {
    type Buf<T: Elem> = EmuBuf<T>;
    type Pins<'a> = ();

    fn upload<T: Elem>(&self, data: &[T]) -> headwise::Result<EmuBuf<T>> {
        EMU.upload(data)
    }
    fn zeros<T: Elem>(&self, n: usize) -> headwise::Result<EmuBuf<T>> {
        EMU.zeros(n)
    }
    fn download<T: Elem>(&self, buf: &EmuBuf<T>) -> headwise::Result<Vec<T>> {
        EMU.download(buf)
    }
    fn overwrite<T: Elem>(&self, buf: &mut EmuBuf<T>, data: &[T]) -> headwise::Result<()> {
        EMU.overwrite(buf, data)
    }
    fn len<T: Elem>(buf: &EmuBuf<T>) -> usize {
        <EmuStore as Store>::len(buf)
    }
    fn sm_count(&self) -> usize {
        EMU.sm_count()
    }
    fn check_buf<T: Elem>(&self, field: &str, buf: &EmuBuf<T>) -> headwise::Result<()> {
        EMU.check_buf(field, buf)
    }
    fn addr<'a, T: Elem>(&'a self, field: &str, buf: &'a EmuBuf<T>, pins: &mut ()) -> headwise::Result<u64> {
        EMU.addr(field, buf, pins)
    }
    fn addr_mut<'a, T: Elem>(
        &'a self,
        field: &str,
        buf: &'a mut EmuBuf<T>,
        pins: &mut (),
    ) -> headwise::Result<u64> {
        EMU.addr_mut(field, buf, pins)
    }
    unsafe fn launch<P: KernelParams>(
        &self,
        name: &'static str,
        cfg: &HwLaunch,
        params: &P,
    ) -> headwise::Result<()> {
        self.0.set(self.0.get() + 1);
        // SAFETY: forwarded; the caller's contract is EmuStore::launch's.
        unsafe { EMU.launch(name, cfg, params) }
    }
}

fn store(p: &Probe) -> Counting {
    Counting(p.launches.clone())
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond { Ok(()) } else { Err(TestCaseError::fail(what())) }
}

// ---------------------------------------------------------------------------------------------
// Layouts.

/// A valid segment table: segments packed in index order with small gaps, Full and Streaming
/// (some with a wrapped ring), some of capacity 0.
#[derive(Clone, Debug)]
struct Table {
    batch: usize,
    kv_heads: usize,
    total_rows: u64,
    segs: Vec<Segment>,
}

fn end(s: &Segment) -> u64 {
    u64::from(s.offset) + u64::from(s.capacity)
}

fn table() -> impl Strategy<Value = Table> {
    (1usize..=3, 1usize..=3)
        .prop_flat_map(|(batch, kv_heads)| {
            let spec = (0u8..3, 0u32..6, 0u32..6, 0u32..3, any::<u32>());
            (Just(batch), Just(kv_heads), prop::collection::vec(spec, batch * kv_heads), 0u64..3)
        })
        .prop_map(|(batch, kv_heads, specs, extra)| {
            let mut off = 0u32;
            let mut segs = Vec::new();
            for (kind, a, b, gap, r) in specs {
                off += gap;
                let s = if kind < 2 {
                    Segment::full(off, a + b, a)
                } else {
                    let (sink, window) = (a % 4, b + 1);
                    let len = r % (sink + window + 1);
                    let ring_head = if len == sink + window { (r / 7) % window } else { 0 };
                    Segment { len, ring_head, ..Segment::streaming(off, sink, window) }
                };
                off += s.capacity;
                segs.push(s);
            }
            Table { batch, kv_heads, total_rows: u64::from(off) + extra, segs }
        })
}

#[derive(Clone, Debug)]
enum LayoutFault {
    None,
    SegmentCount(bool),
    BatchZero,
    KvHeadsZero,
    TotalRowsAboveInt32(u64),
    PastTheEnd(usize, u32),
    OffsetNearU32Max(usize, u32),
    LenAboveCapacity(usize, u32),
    FullRingHead(usize, u32),
    WindowZero(usize),
    SinkPlusWindowMismatch(usize, u32),
    RingHeadOutOfRange(usize, u32),
    Overlap(usize, usize, u32),
    EndsAtInt32Max,
    PastInt32Max(u32),
}

fn layout_fault() -> impl Strategy<Value = LayoutFault> {
    let i = 0usize..9;
    let x = any::<u32>();
    prop_oneof![
        Just(LayoutFault::None),
        any::<bool>().prop_map(LayoutFault::SegmentCount),
        Just(LayoutFault::BatchZero),
        Just(LayoutFault::KvHeadsZero),
        (0u64..1 << 40).prop_map(LayoutFault::TotalRowsAboveInt32),
        (i.clone(), x).prop_map(|(i, x)| LayoutFault::PastTheEnd(i, x)),
        (i.clone(), 0u32..64).prop_map(|(i, x)| LayoutFault::OffsetNearU32Max(i, x)),
        (i.clone(), x).prop_map(|(i, x)| LayoutFault::LenAboveCapacity(i, x)),
        (i.clone(), x).prop_map(|(i, x)| LayoutFault::FullRingHead(i, x)),
        i.clone().prop_map(LayoutFault::WindowZero),
        (i.clone(), 0u32..1000).prop_map(|(i, x)| LayoutFault::SinkPlusWindowMismatch(i, x)),
        (i.clone(), x).prop_map(|(i, x)| LayoutFault::RingHeadOutOfRange(i, x)),
        (i.clone(), i, x).prop_map(|(i, j, x)| LayoutFault::Overlap(i, j, x)),
        Just(LayoutFault::EndsAtInt32Max),
        x.prop_map(LayoutFault::PastInt32Max),
    ]
}

/// The first segment at or after `i` (cyclically) that satisfies `pred`.
fn pick(segs: &[Segment], i: usize, pred: impl Fn(&Segment) -> bool) -> Option<usize> {
    (0..segs.len()).map(|k| (i + k) % segs.len()).find(|&k| pred(&segs[k]))
}

fn overlaps(a: &Segment, b: &Segment) -> bool {
    a.capacity > 0 && b.capacity > 0 && u64::from(a.offset) < end(b) && u64::from(b.offset) < end(a)
}

/// Breaks `t` in the one way `fault` says and returns what `LayerLayout::new` must report. A
/// fault that needs a kind of segment the table lacks becomes `len > capacity` on segment `i`.
fn apply(t: &mut Table, fault: &LayoutFault) -> Expect {
    let n = t.segs.len();
    let seg = |i: usize, f: &str| invalid(format!("segments[{i}].{f}"));
    let len_fault = |t: &mut Table, i: usize, x: u32| {
        let s = &mut t.segs[i % n];
        s.len = s.capacity.saturating_add(1).saturating_add(x % 1000);
        seg(i % n, "len")
    };
    match *fault {
        LayoutFault::None => Expect::Ok,
        LayoutFault::SegmentCount(add) => {
            if add {
                t.segs.push(Segment::full(0, 0, 0));
            } else {
                t.segs.pop();
            }
            invalid("segments")
        }
        LayoutFault::BatchZero => {
            t.batch = 0;
            invalid("batch")
        }
        LayoutFault::KvHeadsZero => {
            t.kv_heads = 0;
            invalid("kv_heads")
        }
        LayoutFault::TotalRowsAboveInt32(x) => {
            t.total_rows = MAX_ROWS + 1 + x;
            invalid("total_rows")
        }
        LayoutFault::PastTheEnd(i, x) => match pick(&t.segs, i, |s| s.capacity > 0) {
            Some(k) => {
                let s = &mut t.segs[k];
                let beyond = 1 + u64::from(x) % 3;
                s.offset = (t.total_rows + beyond - u64::from(s.capacity)) as u32;
                seg(k, "capacity")
            }
            None => len_fault(t, i, x),
        },
        LayoutFault::OffsetNearU32Max(i, x) => {
            let s = &mut t.segs[i % n];
            s.offset = u32::MAX - x;
            s.capacity = s.capacity.max(x + 1);
            s.len = 0;
            s.ring_head = 0;
            if let SegmentMode::Streaming { .. } = s.mode {
                s.mode = SegmentMode::Streaming { sink: s.capacity - 1, window: 1 };
            }
            seg(i % n, "capacity")
        }
        LayoutFault::LenAboveCapacity(i, x) => len_fault(t, i, x),
        LayoutFault::FullRingHead(i, x) => match pick(&t.segs, i, |s| s.mode == SegmentMode::Full) {
            Some(k) => {
                t.segs[k].ring_head = x.max(1);
                seg(k, "ring_head")
            }
            None => len_fault(t, i, x),
        },
        LayoutFault::WindowZero(i) => {
            match pick(&t.segs, i, |s| matches!(s.mode, SegmentMode::Streaming { .. })) {
                Some(k) => {
                    let s = &mut t.segs[k];
                    s.mode = SegmentMode::Streaming { sink: s.capacity, window: 0 };
                    s.ring_head = 0;
                    seg(k, "mode.window")
                }
                None => len_fault(t, i, 0),
            }
        }
        LayoutFault::SinkPlusWindowMismatch(i, x) => {
            match pick(&t.segs, i, |s| matches!(s.mode, SegmentMode::Streaming { .. })) {
                Some(k) => {
                    let s = &mut t.segs[k];
                    if let SegmentMode::Streaming { sink, window } = s.mode {
                        s.mode = SegmentMode::Streaming { sink: sink + 1 + x, window };
                    }
                    seg(k, "capacity")
                }
                None => len_fault(t, i, x),
            }
        }
        LayoutFault::RingHeadOutOfRange(i, x) => {
            match pick(&t.segs, i, |s| matches!(s.mode, SegmentMode::Streaming { .. })) {
                Some(k) => {
                    let s = &mut t.segs[k];
                    let SegmentMode::Streaming { sink, window } = s.mode else { unreachable!() };
                    // A ring holding tokens: beyond the window; an empty ring: anything but 0.
                    s.ring_head = if s.len > sink { window.saturating_add(x % 1000) } else { x.max(1) };
                    seg(k, "ring_head")
                }
                None => len_fault(t, i, x),
            }
        }
        LayoutFault::Overlap(i, j, x) => {
            let Some(a) = pick(&t.segs, i, |s| s.capacity > 0) else { return len_fault(t, i, x) };
            let Some(b) = pick(&t.segs, j, |s| s.capacity > 0).filter(|&b| b != a) else {
                return len_fault(t, i, x);
            };
            let start = t.segs[a].offset + x % t.segs[a].capacity;
            t.segs[b].offset = start;
            t.total_rows = t.total_rows.max(end(&t.segs[b]));
            let segs = t.segs.clone();
            // Which of the overlapping segments is reported depends on the sort order; any one
            // that really overlaps another is right.
            Expect::InvalidWhere(
                "the named segment overlaps another",
                Rc::new(move |field| {
                    let k = field.strip_prefix("segments[").and_then(|r| r.strip_suffix(']'));
                    k.and_then(|k| k.parse::<usize>().ok()).is_some_and(|k| {
                        k < segs.len() && (0..segs.len()).any(|o| o != k && overlaps(&segs[k], &segs[o]))
                    })
                }),
            )
        }
        LayoutFault::EndsAtInt32Max | LayoutFault::PastInt32Max(_) => {
            // Shift the table so it ends exactly at the last row int32 metadata can address.
            let top = t.segs.iter().map(end).max().unwrap_or(0);
            let shift = (MAX_ROWS - top) as u32;
            for s in &mut t.segs {
                s.offset += shift;
            }
            t.total_rows = MAX_ROWS;
            let LayoutFault::PastInt32Max(x) = *fault else { return Expect::Ok };
            match pick(&t.segs, 0, |s| end(s) == MAX_ROWS && s.mode == SegmentMode::Full) {
                Some(k) => {
                    t.segs[k].capacity += 1 + x % 1000;
                    seg(k, "capacity")
                }
                None => len_fault(t, 0, x),
            }
        }
    }
}

fn layout_new(b: &mut Battery) {
    b.run("LayerLayout::new", 30_000, (table(), layout_fault()), |p, (mut t, fault)| {
        let expect = apply(&mut t, &fault);
        let Table { batch, kv_heads, total_rows, segs } = t.clone();
        let ok = matches!(expect, Expect::Ok);
        if let Some(l) = p.call(expect, || LayerLayout::new(batch, kv_heads, total_rows, segs))? {
            check(ok && l.segments() == &t.segs[..] && l.total_rows() as u64 == t.total_rows, || {
                format!("accepted layout differs from its table: {l:?}")
            })?;
        }
        Ok(())
    });
}

#[derive(Clone, Debug)]
enum BuilderFault {
    None,
    OutsideGrid(usize, usize),
    WindowZero(usize),
    HugeLen(usize, u32),
    HugeSink(usize, u32),
    HugeHeadroom(u32),
    TooManySegments(usize, usize),
    BatchZero,
    KvHeadsZero,
}

fn builder_fault() -> impl Strategy<Value = BuilderFault> {
    prop_oneof![
        Just(BuilderFault::None),
        (0usize..20, 0usize..20).prop_map(|(b, h)| BuilderFault::OutsideGrid(b, h)),
        (0usize..9).prop_map(BuilderFault::WindowZero),
        (0usize..9, 0u32..16).prop_map(|(i, x)| BuilderFault::HugeLen(i, x)),
        (0usize..9, 0u32..16).prop_map(|(i, x)| BuilderFault::HugeSink(i, x)),
        (0u32..16).prop_map(BuilderFault::HugeHeadroom),
        prop_oneof![
            (MAX_BUILDER_SEGMENTS + 1..usize::MAX).prop_map(|n| (n, 1)),
            (1usize << 13..1 << 20, 1usize << 12..1 << 20).prop_map(|(b, h)| (b, h)),
            (2usize..64).prop_map(|h| (usize::MAX / 2 + 1, h)),
        ]
        .prop_map(|(b, h)| BuilderFault::TooManySegments(b, h)),
        Just(BuilderFault::BatchZero),
        Just(BuilderFault::KvHeadsZero),
    ]
}

fn layout_builder(b: &mut Battery) {
    let specs = prop::collection::vec((any::<bool>(), 0u32..10, 0u32..4, 1u32..6), 1..=9);
    b.run(
        "LayoutBuilder::build",
        15_000,
        (1usize..=3, specs, 0u32..8, builder_fault()),
        |p, (batch, specs, headroom, fault)| {
            // Specs fill slot after slot of a batch x kv_heads grid.
            let kv_heads = specs.len().div_ceil(batch);
            let (mut batch, mut kv_heads, mut headroom) = (batch, kv_heads, headroom);
            let mut ops: Vec<(usize, usize, SegmentMode, u32)> = specs
                .iter()
                .enumerate()
                .map(|(i, &(streaming, len, sink, window))| {
                    let mode =
                        if streaming { SegmentMode::Streaming { sink, window } } else { SegmentMode::Full };
                    (i / kv_heads, i % kv_heads, mode, len)
                })
                .collect();
            let n = batch * kv_heads;
            let slot_of = |i: usize| i % n;
            let expect = match fault {
                BuilderFault::None => Expect::Ok,
                BuilderFault::OutsideGrid(b, h) => {
                    let (b, h) =
                        if b % 2 == 0 { (batch + b, h % kv_heads) } else { (b % batch, kv_heads + h) };
                    ops.push((b, h, SegmentMode::Full, 1));
                    invalid("segment")
                }
                BuilderFault::WindowZero(i) => {
                    let s = slot_of(i);
                    ops.push((s / kv_heads, s % kv_heads, SegmentMode::Streaming { sink: 1, window: 0 }, 0));
                    invalid(format!("segments[{s}].mode.window"))
                }
                BuilderFault::HugeLen(i, x) => {
                    let s = slot_of(i);
                    ops.push((s / kv_heads, s % kv_heads, SegmentMode::Full, u32::MAX - x));
                    builder_overflow_at(&ops, batch, kv_heads, headroom)
                }
                BuilderFault::HugeSink(i, x) => {
                    let s = slot_of(i);
                    let mode = SegmentMode::Streaming { sink: (MAX_ROWS as u32) - x, window: 1 + x * 2 };
                    ops.push((s / kv_heads, s % kv_heads, mode, 0));
                    builder_overflow_at(&ops, batch, kv_heads, headroom)
                }
                BuilderFault::HugeHeadroom(x) => {
                    headroom = u32::MAX - x;
                    builder_overflow_at(&ops, batch, kv_heads, headroom)
                }
                BuilderFault::TooManySegments(b, h) => {
                    (batch, kv_heads) = (b, h);
                    invalid("batch * kv_heads")
                }
                BuilderFault::BatchZero => {
                    (batch, ops) = (0, vec![]);
                    invalid("batch")
                }
                BuilderFault::KvHeadsZero => {
                    (kv_heads, ops) = (0, vec![]);
                    invalid("kv_heads")
                }
            };
            let ok = matches!(expect, Expect::Ok);
            let built = p.call(expect, || {
                let mut lb = LayoutBuilder::new(batch, kv_heads).headroom(headroom);
                for &(b, h, mode, len) in &ops {
                    lb = match mode {
                        SegmentMode::Full => lb.full(b, h, len),
                        SegmentMode::Streaming { sink, window } => lb.streaming(b, h, sink, window),
                    };
                }
                lb.build()
            })?;
            if let Some(l) = built {
                let total: u64 = l.segments().iter().map(|s| u64::from(s.capacity)).sum();
                check(ok && l.total_rows() as u64 == total && l.segments().len() == n, || format!("{l:?}"))?;
            }
            Ok(())
        },
    );
}

/// The error a packed build must report when its rows overflow: the first segment whose
/// prefix sum of capacities passes `MAX_ROWS` (the last op for a slot wins).
fn builder_overflow_at(
    ops: &[(usize, usize, SegmentMode, u32)],
    batch: usize,
    kv_heads: usize,
    headroom: u32,
) -> Expect {
    let mut slots = vec![(SegmentMode::Full, 0u32); batch * kv_heads];
    for &(b, h, mode, len) in ops {
        slots[b * kv_heads + h] = (mode, len);
    }
    let mut total = 0u64;
    for (i, &(mode, len)) in slots.iter().enumerate() {
        total += match mode {
            SegmentMode::Full => u64::from(len) + u64::from(headroom),
            SegmentMode::Streaming { sink, window } => u64::from(sink) + u64::from(window),
        };
        if total > MAX_ROWS {
            return invalid(format!("segments[{i}]"));
        }
    }
    Expect::Ok
}

fn layout_regrown(b: &mut Battery) {
    let headroom = prop_oneof![
        0u32..64,
        (0u32..1 << 20).prop_map(|x| u32::MAX - x),
        (-4i64..4).prop_map(|d| {
            // Around the largest headroom a one-Full-segment table can take.
            (MAX_ROWS as i64 - 64 + d) as u32
        })
    ];
    b.run("LayerLayout::regrown", 5_000, (table(), headroom), |p, (t, headroom)| {
        let layout = LayerLayout::new(t.batch, t.kv_heads, t.total_rows, t.segs).unwrap();
        let want: u64 = layout
            .segments()
            .iter()
            .map(|s| match s.mode {
                SegmentMode::Full => u64::from(s.len) + u64::from(headroom),
                SegmentMode::Streaming { .. } => u64::from(s.capacity),
            })
            .sum();
        let expect = if want > MAX_ROWS { invalid("headroom") } else { Expect::Ok };
        if let Some(g) = p.call(expect, || layout.regrown(headroom))? {
            check(g.total_rows() as u64 == want, || {
                format!("regrown to {} rows, want {want}", g.total_rows())
            })?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Gate files and head policies.

/// A valid gate file: rows of values (some outside [0, 1], clipped by the parser), written with
/// assorted separators, number formats, blank lines and line endings.
#[derive(Clone, Debug)]
struct Tsv {
    rows: Vec<Vec<String>>,
    seps: Vec<&'static str>,
    blank_before: Vec<bool>,
    crlf: bool,
}

impl Tsv {
    fn render(&self) -> (String, Vec<usize>) {
        let nl = if self.crlf { "\r\n" } else { "\n" };
        let (mut text, mut line_of, mut line) = (String::new(), Vec::new(), 1);
        for (r, row) in self.rows.iter().enumerate() {
            if self.blank_before[r] {
                text += nl;
                line += 1;
            }
            text += &row.join(self.seps[r]);
            text += nl;
            line_of.push(line);
            line += 1;
        }
        (text, line_of)
    }
}

fn number() -> impl Strategy<Value = String> {
    (-0.5f64..1.5, 0u8..4).prop_map(|(x, f)| match f {
        0 => format!("{x}"),
        1 => format!("{x:e}"),
        2 => format!("{x:.3}"),
        _ => format!("{:+.2E}", x),
    })
}

fn tsv() -> impl Strategy<Value = Tsv> {
    (1usize..5, 1usize..6)
        .prop_flat_map(|(l, h)| {
            (
                prop::collection::vec(prop::collection::vec(number(), h), l),
                prop::collection::vec(prop::sample::select(vec!["\t", " ", "  ", "\t "]), l),
                prop::collection::vec(prop::bool::weighted(0.2), l),
                any::<bool>(),
            )
        })
        .prop_map(|(rows, seps, blank_before, crlf)| Tsv { rows, seps, blank_before, crlf })
}

#[derive(Clone, Debug)]
enum TsvFault {
    None,
    Empty(&'static str),
    Ragged(usize, bool),
    NotANumber(usize, usize, &'static str),
    NotFinite(usize, usize, &'static str),
    Truncated(usize),
    Garbage(String),
    Huge(usize, usize),
}

fn tsv_fault() -> impl Strategy<Value = TsvFault> {
    let bad = ["abc", "0.5.5", "1,5", "--1", "0x10", "1e", "e5", "+-1", ".", "-", "1_000", "½", "0.5;"];
    let non_finite = ["nan", "NaN", "inf", "-inf", "+infinity", "1e400", "-1e999", "Infinity"];
    prop_oneof![
        Just(TsvFault::None),
        prop::sample::select(vec!["", "\n", "\n\n  \t\n", "\r\n", " "]).prop_map(TsvFault::Empty),
        (0usize..5, any::<bool>()).prop_map(|(r, add)| TsvFault::Ragged(r, add)),
        (0usize..5, 0usize..6, prop::sample::select(bad.to_vec()))
            .prop_map(|(r, c, t)| TsvFault::NotANumber(r, c, t)),
        (0usize..5, 0usize..6, prop::sample::select(non_finite.to_vec()))
            .prop_map(|(r, c, t)| TsvFault::NotFinite(r, c, t)),
        any::<usize>().prop_map(TsvFault::Truncated),
        "[0-9a-z.eE+ \t\r\n-]{0,60}".prop_map(TsvFault::Garbage),
        (1usize..20, 1usize..200).prop_map(|(l, h)| TsvFault::Huge(l, h)),
    ]
}

/// The field a gate file's first fault must be reported under, from the documented format:
/// lines, trimmed; fields split on tabs and spaces; finite floats; every row as wide as the
/// first; at least one row.
fn tsv_first_fault(text: &str) -> Option<String> {
    let mut width = None;
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.trim().split(['\t', ' ']).filter(|f| !f.is_empty()).collect();
        if fields.is_empty() {
            continue;
        }
        for (j, f) in fields.iter().enumerate() {
            if !f.parse::<f64>().is_ok_and(f64::is_finite) {
                return Some(format!("gates line {} column {}", i + 1, j + 1));
            }
        }
        match width {
            None => width = Some(fields.len()),
            Some(w) if w != fields.len() => return Some(format!("gates line {}", i + 1)),
            _ => {}
        }
    }
    width.is_none().then(|| "gates".to_string())
}

fn gates_parse_tsv(b: &mut Battery) {
    b.run("HeadGates::parse_tsv", 15_000, (tsv(), tsv_fault()), |p, (mut tsv, fault)| {
        let (layers, width) = (tsv.rows.len(), tsv.rows[0].len());
        let (text, expect) = match fault {
            TsvFault::None => (tsv.render().0, Expect::Ok),
            TsvFault::Empty(t) => (t.to_string(), invalid("gates")),
            TsvFault::Ragged(r, add) => {
                let r = r % layers;
                if add || width == 1 {
                    tsv.rows[r].push("0.5".into());
                } else {
                    tsv.rows[r].pop();
                }
                let (text, line_of) = tsv.render();
                // Rows are compared with the first: changing the first puts the second at fault.
                let expect = match r {
                    0 if layers == 1 => Expect::Ok,
                    0 => invalid(format!("gates line {}", line_of[1])),
                    _ => invalid(format!("gates line {}", line_of[r])),
                };
                (text, expect)
            }
            TsvFault::NotANumber(r, c, tok) | TsvFault::NotFinite(r, c, tok) => {
                let (r, c) = (r % layers, c % width);
                tsv.rows[r][c] = tok.to_string();
                let (text, line_of) = tsv.render();
                (text, invalid(format!("gates line {} column {}", line_of[r], c + 1)))
            }
            TsvFault::Truncated(at) => {
                let text = tsv.render().0;
                let text = text[..at % text.len()].to_string(); // ASCII: every cut is a boundary
                let expect = tsv_first_fault(&text).map_or(Expect::Ok, invalid);
                (text, expect)
            }
            TsvFault::Garbage(text) => {
                let expect = tsv_first_fault(&text).map_or(Expect::Ok, invalid);
                (text, expect)
            }
            TsvFault::Huge(l, h) => {
                let row = vec!["0.25"; h].join("\t");
                (vec![row; l].join("\n"), Expect::Ok)
            }
        };
        let ok = matches!(expect, Expect::Ok);
        if let Some(g) = p.call(expect, || HeadGates::parse_tsv(&text))? {
            check(ok && g.layers() >= 1 && g.kv_heads() >= 1, || "empty gates accepted".into())?;
            let all_clipped =
                (0..g.layers()).all(|l| (0..g.kv_heads()).all(|h| (0.0..=1.0).contains(&g.gate(l, h))));
            check(all_clipped, || format!("unclipped gates from {text:?}"))?;
        }
        Ok(())
    });
}

fn gates() -> HeadGates {
    HeadGates::parse_tsv("0.9\t0.1\t0.5\n0.5\t1.0\t0.0\n0.3\t0.7\t0.2\n").unwrap()
}

fn gates_select_full(b: &mut Battery) {
    let sparsity = prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-f64::MIN_POSITIVE),
        Just(1.0 + f64::EPSILON),
        -1e300f64..0.0,
        1.0f64..1e300,
        0.0f64..=1.0,
        Just(-0.0),
    ];
    let g = gates();
    b.run("HeadGates::select_full", 5_000, sparsity, |p, s| {
        let expect = if (0.0..=1.0).contains(&s) { Expect::Ok } else { invalid("sparsity") };
        if let Some(full) = p.call(expect, || g.select_full(s))? {
            check(full.count_full() >= 1, || format!("sparsity {s}: no full head left"))?;
        }
        Ok(())
    });
}

#[derive(Clone, Debug)]
enum HeadLayoutFault {
    None,
    Layer(usize),
    WindowZero,
    HugeContext(usize, u32),
    HugeHeadroom(u32),
    NoSequences,
}

fn full_heads_layer_layout(b: &mut Battery) {
    let fault = prop_oneof![
        Just(HeadLayoutFault::None),
        prop_oneof![3usize..100, Just(usize::MAX)].prop_map(HeadLayoutFault::Layer),
        Just(HeadLayoutFault::WindowZero),
        (0usize..4, 0u32..16).prop_map(|(s, x)| HeadLayoutFault::HugeContext(s, x)),
        (0u32..16).prop_map(HeadLayoutFault::HugeHeadroom),
        Just(HeadLayoutFault::NoSequences),
    ];
    let full = gates().select_full(0.5).unwrap();
    let lens = prop::collection::vec(0u32..100, 1..4);
    let size = (0u32..20, 1u32..20).prop_map(|(sink, window)| StreamingSize { sink, window });
    b.run(
        "FullHeads::layer_layout",
        5_000,
        (0usize..3, lens, 0u32..8, size, fault),
        |p, (layer, mut lens, mut headroom, mut size, fault)| {
            let mut layer = layer;
            let expect = match fault {
                HeadLayoutFault::None => Expect::Ok,
                HeadLayoutFault::Layer(l) => {
                    layer = l;
                    invalid("layer")
                }
                HeadLayoutFault::WindowZero => {
                    size.window = 0;
                    invalid("size.window")
                }
                HeadLayoutFault::HugeContext(s, x) => {
                    let s = s % lens.len();
                    lens[s] = u32::MAX - x;
                    packed_overflow(&full, layer, &lens, headroom, size)
                }
                HeadLayoutFault::HugeHeadroom(x) => {
                    headroom = u32::MAX - x;
                    packed_overflow(&full, layer, &lens, headroom, size)
                }
                HeadLayoutFault::NoSequences => {
                    lens.clear();
                    invalid("batch")
                }
            };
            let ok = matches!(expect, Expect::Ok);
            if let Some(l) = p.call(expect, || full.layer_layout(layer, &lens, headroom, size))? {
                check(ok && l.segments().len() == lens.len() * full.kv_heads(), || format!("{l:?}"))?;
            }
            Ok(())
        },
    );
}

/// The first segment of a head-policy layout whose packed rows pass `MAX_ROWS`, if any.
fn packed_overflow(
    full: &FullHeads,
    layer: usize,
    lens: &[u32],
    headroom: u32,
    size: StreamingSize,
) -> Expect {
    let mut total = 0u64;
    for (b, &len) in lens.iter().enumerate() {
        for h in 0..full.kv_heads() {
            total += if full.is_full(layer, h) {
                u64::from(len) + u64::from(headroom)
            } else {
                u64::from(size.sink) + u64::from(size.window)
            };
            if total > MAX_ROWS {
                return invalid(format!("segments[{}]", b * full.kv_heads() + h));
            }
        }
    }
    Expect::Ok
}

fn full_heads_all_full(b: &mut Battery) {
    let dims = prop_oneof![
        40 => (1usize..100, 1usize..100),
        // The bound itself allocates a million flags: rare.
        1 => Just((1usize << 10, 1usize << 10)),
        20 => Just((1usize << 10, (1usize << 10) + 1)),
        20 => (1usize << 12..1 << 20, 1usize << 13..1 << 20),
        20 => (usize::MAX / 2..usize::MAX, 2usize..1000),
        20 => (2usize..1000, usize::MAX / 2..usize::MAX),
    ];
    b.run("FullHeads::all_full", 2_000, dims, |p, (layers, kv_heads)| {
        let small = layers.checked_mul(kv_heads).is_some_and(|n| n <= MAX_HEADS);
        let expect = if small { Expect::Ok } else { invalid("layers * kv_heads") };
        if let Some(f) = p.call(expect, || FullHeads::all_full(layers, kv_heads))? {
            check(f.count_full() == layers * kv_heads, || "not all full".into())?;
        }
        Ok(())
    });
}

/// One key of a DuoAttention config.json.
#[derive(Clone, Debug)]
enum ConfigValue {
    Missing,
    Null,
    Count(u32),
    Bad(&'static str),
}

fn config_value() -> impl Strategy<Value = ConfigValue> {
    let bad = ["-1", "2.5", "\"64\"", "true", "[]", "{}", "4294967296", "1e20", "-0.5", "[64]"];
    prop_oneof![
        Just(ConfigValue::Missing),
        Just(ConfigValue::Null),
        prop_oneof![0u32..600, Just(u32::MAX)].prop_map(ConfigValue::Count),
        prop::sample::select(bad.to_vec()).prop_map(ConfigValue::Bad),
    ]
}

fn duo_config(b: &mut Battery) {
    let keys = ["sink_size", "recent_size", "deploy_sink_size", "deploy_recent_size"];
    let text_fault = prop_oneof![
        Just(None),
        any::<usize>().prop_map(Some), // truncate the text there
    ];
    let values = prop::collection::vec(config_value(), 4);
    let shape = prop_oneof![
        4 => Just("object"),
        1 => prop::sample::select(vec!["[]", "5", "null", "\"config\"", "[{\"sink_size\": 4}]", ""]),
    ];
    b.run("duo_attention_config", 8_000, (values, text_fault, shape), |p, (values, cut, shape)| {
        let (text, expect) = if shape != "object" {
            let expect =
                if shape.is_empty() { invalid("config.json") } else { invalid("config.json sink_size") };
            (shape.to_string(), expect)
        } else {
            let fields: Vec<String> = std::iter::once("\"model_name\": \"m\"".to_string())
                .chain(keys.iter().zip(&values).filter_map(|(k, v)| match v {
                    ConfigValue::Missing => None,
                    ConfigValue::Null => Some(format!("\"{k}\": null")),
                    ConfigValue::Count(n) => Some(format!("\"{k}\": {n}")),
                    ConfigValue::Bad(t) => Some(format!("\"{k}\": {t}")),
                }))
                .collect();
            let text = format!("{{{}}}", fields.join(", "));
            match cut {
                // Every proper prefix of a JSON object is malformed.
                Some(at) => (text[..at % text.len()].to_string(), invalid("config.json")),
                None => {
                    // The deploy key wins when present and not null; the error names the key read.
                    let read = |deploy: usize, train: usize| match &values[deploy] {
                        ConfigValue::Missing | ConfigValue::Null => (keys[train], &values[train]),
                        v => (keys[deploy], v),
                    };
                    let mut expect = Expect::Ok;
                    for (deploy, train) in [(2, 0), (3, 1)] {
                        let (key, v) = read(deploy, train);
                        let fault = match v {
                            ConfigValue::Count(0) if train == 1 => true,
                            ConfigValue::Count(_) => false,
                            _ => true,
                        };
                        if fault {
                            expect = invalid(format!("config.json {key}"));
                            break;
                        }
                    }
                    (text, expect)
                }
            }
        };
        let ok = matches!(expect, Expect::Ok);
        if let Some(size) = p.call(expect, || duo_attention_config(&text))? {
            check(ok && size.window >= 1, || format!("{size:?} from {text}"))?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// HeadKV score files and budgets.

/// A valid HeadKV score file: a full `layers x heads` grid, lists of 1..4 non-negative numbers.
#[derive(Clone, Debug)]
struct Scores {
    layers: usize,
    heads: usize,
    lists: Vec<Vec<f64>>,
}

impl Scores {
    fn entries(&self) -> Vec<(String, String)> {
        (0..self.layers * self.heads)
            .map(|i| {
                let list: Vec<String> = self.lists[i].iter().map(|x| format!("{x}")).collect();
                (format!("{}-{}", i / self.heads, i % self.heads), format!("[{}]", list.join(", ")))
            })
            .collect()
    }
}

fn render_json(entries: &[(String, String)]) -> String {
    let body: Vec<String> = entries.iter().map(|(k, v)| format!("{k:?}: {v}")).collect();
    format!("{{{}}}", body.join(", "))
}

fn scores() -> impl Strategy<Value = Scores> {
    (1usize..4, 1usize..5).prop_flat_map(|(layers, heads)| {
        let list = prop::collection::vec(0.0f64..1.0, 1..4);
        prop::collection::vec(list, layers * heads).prop_map(move |lists| Scores { layers, heads, lists })
    })
}

#[derive(Clone, Debug)]
enum ScoresFault {
    None,
    Truncated(usize),
    NotAnObject(&'static str),
    BadKey(usize, &'static str),
    IndexBeyondGrid(usize, usize),
    BadValue(usize, &'static str),
    Hole(usize),
    SameHeadTwice(usize, usize),
}

fn scores_fault() -> impl Strategy<Value = ScoresFault> {
    let keys = [
        "a-b",
        "1",
        "1-",
        "-0",
        "0--1",
        "1-2-3",
        " 0-0",
        "0-0 ",
        "0-x",
        "",
        "\u{663}-0",
        "0-99999999999999999999",
    ];
    let values = [
        "[]",
        "1",
        "\"x\"",
        "null",
        "{}",
        "[1, \"x\"]",
        "[null]",
        "[[1]]",
        "[true]",
        "[1e300, 1e300]",
        "[1.7976931348623157e308, 1.7976931348623157e308]",
        "[-1e39]",
    ];
    prop_oneof![
        Just(ScoresFault::None),
        any::<usize>().prop_map(ScoresFault::Truncated),
        prop::sample::select(vec!["[]", "5", "\"x\"", "null", "[{\"0-0\": [1]}]", "{}", "", "NaN"])
            .prop_map(ScoresFault::NotAnObject),
        (0usize..16, prop::sample::select(keys.to_vec())).prop_map(|(i, k)| ScoresFault::BadKey(i, k)),
        (0u8..3, 0usize..4).prop_map(|(kind, x)| match kind {
            0 => ScoresFault::IndexBeyondGrid(usize::MAX - x, x),
            1 => ScoresFault::IndexBeyondGrid(x, usize::MAX),
            _ => ScoresFault::IndexBeyondGrid(x, x),
        }),
        (0usize..16, prop::sample::select(values.to_vec())).prop_map(|(i, v)| ScoresFault::BadValue(i, v)),
        (0usize..16).prop_map(ScoresFault::Hole),
        (0usize..16, 0usize..16).prop_map(|(i, j)| ScoresFault::SameHeadTwice(i, j)),
    ]
}

/// Whether keys `(l, h)` form a full grid, each once.
fn full_grid(keys: &[(usize, usize)]) -> bool {
    let layers = keys.iter().map(|k| k.0).max().map_or(0, |m| m + 1);
    let heads = keys.iter().map(|k| k.1).max().map_or(0, |m| m + 1);
    let mut seen = std::collections::HashSet::new();
    layers * heads == keys.len() && keys.iter().all(|k| seen.insert(*k))
}

fn head_scores_parse_json(b: &mut Battery) {
    b.run("HeadScores::parse_json", 12_000, (scores(), scores_fault()), |p, (s, fault)| {
        let mut entries = s.entries();
        let n = entries.len();
        let key_field = |k: &str| invalid(format!("head scores key {k:?}"));
        let (text, expect) = match fault {
            ScoresFault::None => (render_json(&entries), Expect::Ok),
            ScoresFault::Truncated(at) => {
                let text = render_json(&entries);
                (text[..at % text.len()].to_string(), invalid("head scores"))
            }
            ScoresFault::NotAnObject(t) => (t.to_string(), invalid("head scores")),
            ScoresFault::BadKey(i, k) => {
                entries[i % n].0 = k.to_string();
                (render_json(&entries), key_field(k))
            }
            ScoresFault::IndexBeyondGrid(l, h) => {
                // A new key past the grid (small ones just below or right of it): beyond the key
                // count it names itself (no full grid can reach it); inside, the grid must close.
                let (l, h) = match (l, h) {
                    (l, h) if l > 4 || h > 4 => (l, h),
                    (x, _) if x % 2 == 0 => (s.layers + x, 0),
                    (x, _) => (0, s.heads + x),
                };
                let key = format!("{l}-{h}");
                entries.push((key.clone(), "[0.5]".into()));
                let expect = if l > n || h > n {
                    key_field(&key)
                } else {
                    let keys: Vec<(usize, usize)> =
                        (0..n).map(|i| (i / s.heads, i % s.heads)).chain([(l, h)]).collect();
                    if full_grid(&keys) { Expect::Ok } else { invalid("head scores") }
                };
                (render_json(&entries), expect)
            }
            ScoresFault::BadValue(i, v) => {
                let key = entries[i % n].0.clone();
                entries[i % n].1 = v.to_string();
                (render_json(&entries), key_field(&key))
            }
            ScoresFault::Hole(i) => {
                entries.remove(i % n);
                let keys: Vec<(usize, usize)> =
                    (0..n).filter(|&k| k != i % n).map(|k| (k / s.heads, k % s.heads)).collect();
                // With one key fewer, a key at index >= the key count names itself (the first in
                // the object's sorted key order); otherwise the grid must close.
                let m = keys.len();
                let beyond =
                    keys.iter().filter(|k| k.0 >= m || k.1 >= m).map(|k| format!("{}-{}", k.0, k.1)).min();
                let expect = match beyond {
                    Some(k) => key_field(&k),
                    None if m > 0 && full_grid(&keys) => Expect::Ok,
                    None => invalid("head scores"),
                };
                (render_json(&entries), expect)
            }
            ScoresFault::SameHeadTwice(i, j) => {
                // "0l-h" names the same head as "l-h" under another key.
                let (i, j) = (i % n, j % n);
                if i == j {
                    return Ok(());
                }
                entries[j].0 = format!("0{}", entries[i].0);
                (render_json(&entries), invalid("head scores"))
            }
        };
        let ok = matches!(expect, Expect::Ok);
        if let Some(parsed) = p.call(expect, || HeadScores::parse_json(&text))? {
            let finite = parsed.as_slice().iter().all(|x| x.is_finite());
            check(ok && finite && parsed.as_slice().len() == parsed.layers() * parsed.heads(), || {
                format!("{parsed:?} from {text}")
            })?;
        }
        Ok(())
    });
}

fn head_scores_to_kv_heads(b: &mut Battery) {
    let s = HeadScores::parse_json(&render_json(
        &Scores { layers: 2, heads: 12, lists: vec![vec![0.5]; 24] }.entries(),
    ))
    .unwrap();
    let kv = prop_oneof![0usize..40, Just(usize::MAX), Just(0)];
    b.run("HeadScores::to_kv_heads", 3_000, kv, |p, kv| {
        let expect = if kv > 0 && 12 % kv == 0 { Expect::Ok } else { invalid("kv_heads") };
        if let Some(m) = p.call(expect, || s.to_kv_heads(kv))? {
            check(m.heads() == kv && m.layers() == 2, || format!("{m:?}"))?;
        }
        Ok(())
    });
}

fn budget_uniform(b: &mut Battery) {
    let pair = prop_oneof![(any::<u32>(), any::<u32>()), (0u32..300, 0u32..300)];
    b.run("budget::uniform", 5_000, pair, |p, (capacity, window)| {
        let expect = if capacity > window { Expect::Ok } else { invalid("capacity") };
        if let Some(c) = p.call(expect, || budget::uniform(capacity, window))? {
            check(c == capacity, || format!("{c} != {capacity}"))?;
        }
        Ok(())
    });
}

#[derive(Clone, Debug)]
enum PyramidFault {
    None,
    CapacityNotAboveWindow(u32),
    Layers(usize),
    BetaZero,
    PromptShorterThanWindow(u32),
}

fn budget_pyramid(b: &mut Battery) {
    let valid = (0u32..200, 1u32..300, 2usize..64, 0u32..5000, 1u32..40)
        .prop_map(|(w, extra, layers, q, beta)| (w + extra, w, layers, w + q, beta));
    let huge = (0u32..16).prop_map(|x| (u32::MAX - x, x, 2, u32::MAX - x / 2, 1));
    let fault = prop_oneof![
        Just(PyramidFault::None),
        any::<u32>().prop_map(PyramidFault::CapacityNotAboveWindow),
        prop_oneof![0usize..2, Just(usize::MAX), budget::MAX_LAYERS + 1..usize::MAX, Just(1usize << 40)]
            .prop_map(PyramidFault::Layers),
        Just(PyramidFault::BetaZero),
        any::<u32>().prop_map(PyramidFault::PromptShorterThanWindow),
    ];
    b.run(
        "budget::pyramid",
        8_000,
        (prop_oneof![9 => valid, 1 => huge], fault),
        |p, ((mut c, mut w, mut layers, mut q, mut beta), fault)| {
            let expect = match fault {
                PyramidFault::None => Expect::Ok,
                PyramidFault::CapacityNotAboveWindow(x) => {
                    (c, w) = (w.saturating_sub(x % 3), w.max(1));
                    invalid("capacity")
                }
                PyramidFault::Layers(l) => {
                    layers = l;
                    invalid("layers")
                }
                PyramidFault::BetaZero => {
                    beta = 0;
                    invalid("beta")
                }
                PyramidFault::PromptShorterThanWindow(x) => {
                    (w, c) = (w.max(1), c.max(w.max(1) + 1));
                    q = x % w;
                    invalid("prompt_len")
                }
            };
            if let Some(v) = p.call(expect, || budget::pyramid(c, w, layers, q, beta))? {
                let bounded = v.iter().all(|&x| x >= w && x <= q.max(c));
                check(v.len() == layers && bounded, || format!("{v:?} for C={c} W={w} q={q}"))?;
            }
            Ok(())
        },
    );
}

#[derive(Clone, Debug)]
enum HeadKvFault {
    None,
    Empty,
    BadScore(usize, f32),
    Beta(f32),
    Temp(f32),
    BaseNotAboveWindow(u32),
    AllZero,
    SumOverflows,
    TempUnderflows,
    WindowOverflows(u32),
    BaseTooLarge,
}

fn budget_headkv(b: &mut Battery) {
    let fault = prop_oneof![
        Just(HeadKvFault::None),
        Just(HeadKvFault::Empty),
        (0usize..64, prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1.0, -1e-30]))
            .prop_map(|(i, x)| HeadKvFault::BadScore(i, x)),
        prop::sample::select(vec![f32::NAN, f32::INFINITY, 0.999, 0.0, -1.5]).prop_map(HeadKvFault::Beta),
        prop::sample::select(vec![f32::NAN, f32::INFINITY, 0.0, -0.0, -2.0]).prop_map(HeadKvFault::Temp),
        (0u32..5).prop_map(HeadKvFault::BaseNotAboveWindow),
        Just(HeadKvFault::AllZero),
        Just(HeadKvFault::SumOverflows),
        Just(HeadKvFault::TempUnderflows),
        (0u32..4).prop_map(HeadKvFault::WindowOverflows),
        Just(HeadKvFault::BaseTooLarge),
    ];
    let importance = prop::collection::vec(0.0f32..10.0, 2..64);
    let opts = (1.0f32..4.0, 0.25f32..4.0, any::<bool>());
    b.run(
        "budget::headkv",
        8_000,
        (importance, 0u32..64, 1u32..2000, opts, fault),
        |p, (mut imp, mut w, base, (beta, temp, factory), fault)| {
            let mut base = base + w;
            let variant = if factory { HeadKvVariant::KvCacheFactory } else { HeadKvVariant::HeadKvRepo };
            let mut o = HeadKvOptions { beta, temp, variant };
            imp[0] += 0.5; // never all zero unless asked
            let expect = match fault {
                HeadKvFault::None => Expect::Ok,
                HeadKvFault::Empty => {
                    imp.clear();
                    invalid("importance")
                }
                HeadKvFault::BadScore(i, x) => {
                    let i = i % imp.len();
                    imp[i] = x;
                    invalid(format!("importance[{i}]"))
                }
                HeadKvFault::Beta(x) => {
                    o.beta = x;
                    invalid("beta")
                }
                HeadKvFault::Temp(x) => {
                    o.temp = x;
                    invalid("temp")
                }
                HeadKvFault::BaseNotAboveWindow(x) => {
                    o.variant = HeadKvVariant::HeadKvRepo;
                    base = w.saturating_sub(x);
                    invalid("base_capacity")
                }
                HeadKvFault::AllZero => {
                    imp.iter_mut().for_each(|x| *x = 0.0);
                    invalid("importance")
                }
                HeadKvFault::SumOverflows => {
                    imp.iter_mut().for_each(|x| *x = f32::MAX);
                    invalid("importance")
                }
                HeadKvFault::TempUnderflows => {
                    // Equal scores of 1/n each, raised to a huge power, all become 0.
                    imp.iter_mut().for_each(|x| *x = 1.0);
                    o.variant = HeadKvVariant::HeadKvRepo;
                    o.temp = 1e30;
                    invalid("temp")
                }
                HeadKvFault::WindowOverflows(x) => {
                    // The factory variant does not subtract the window: caps of at least
                    // base - base / beta >= 4 rows plus a window near u32::MAX overflow.
                    (o.variant, o.beta, base, w) = (HeadKvVariant::KvCacheFactory, 1.5, 12, u32::MAX - x);
                    invalid("window")
                }
                HeadKvFault::BaseTooLarge => {
                    (o.variant, base, w) = (HeadKvVariant::HeadKvRepo, u32::MAX, 1);
                    invalid("base_capacity")
                }
            };
            if let Some(v) = p.call(expect, || budget::headkv(&imp, base, w, &o))? {
                check(v.len() == imp.len() && v.iter().all(|&x| x >= w), || format!("{v:?}"))?;
            }
            Ok(())
        },
    );
}

fn head_dim_check(b: &mut Battery) {
    let d = prop_oneof![
        any::<usize>(),
        0usize..1024,
        prop::sample::select(vec![0, 1, 8, 32, 63, 65, 96, 127, 129, 192, 255, 257, 512, usize::MAX]),
    ];
    b.run("dtype::check_head_dim", 2_000, d, |p, d| {
        let expect = if SUPPORTED_HEAD_DIMS.contains(&d) { Expect::Ok } else { invalid("head_dim") };
        p.call(expect, || check_head_dim(d))?;
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// LayerCache and stores (emulator store, counting launches).

/// Unsupported head_dims, including ones a kernel could almost serve.
fn bad_head_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![0, 1, 8, 16, 32, 63, 65, 96, 100, 127, 129, 192, 255, 257, 512, 1024]),
        (0usize..4096).prop_filter("unsupported", |d| !SUPPORTED_HEAD_DIMS.contains(d)),
        Just(usize::MAX),
    ]
}

/// A small valid layout for caches (the first segment Full and full, so appends can fail).
fn cache_layout() -> impl Strategy<Value = LayerLayout> {
    (table(), 0u32..4).prop_map(|(t, x)| {
        let mut segs = t.segs;
        segs[0].len = segs[0].capacity;
        segs[0].ring_head = match segs[0].mode {
            SegmentMode::Streaming { window, .. } => x % window,
            SegmentMode::Full => 0,
        };
        LayerLayout::new(t.batch, t.kv_heads, t.total_rows, segs).unwrap()
    })
}

fn elems(layout: &LayerLayout, d: usize) -> usize {
    layout.total_rows() * d
}

fn cache_new(b: &mut Battery) {
    b.run("LayerCache::new", 1_000, (cache_layout(), bad_head_dim()), |p, (layout, d)| {
        let s = store(p);
        p.call(invalid("head_dim"), || LayerCache::<_, bf16>::new(&s, layout.clone(), d))?;
        let d = SUPPORTED_HEAD_DIMS[layout.total_rows() % 3];
        if let Some(c) = p.call(Expect::Ok, || LayerCache::<_, bf16>::new(&s, layout.clone(), d))? {
            check(c.layout() == &layout && Counting::len(c.k()) == elems(&layout, d), || {
                "wrong cache".into()
            })?;
        }
        Ok(())
    });
}

/// Wrong lengths for a buffer of `want` elements: off by a little, empty, sized for another
/// head_dim.
fn wrong_len(want: usize, rows: usize, x: u32) -> usize {
    let d = SUPPORTED_HEAD_DIMS[x as usize % 3];
    let candidates = [want + 1, want.saturating_sub(1), 0, want * 2 + 8, rows * d + 8, want + 64];
    let n = candidates[(x / 3) as usize % candidates.len()];
    if n == want { want + 1 } else { n }
}

fn cache_from_parts(b: &mut Battery) {
    let which = prop_oneof![Just("head_dim"), Just("k"), Just("v")];
    b.run(
        "LayerCache::from_parts",
        1_500,
        (cache_layout(), which, any::<u32>(), bad_head_dim()),
        |p, (layout, which, x, bad_d)| {
            let s = store(p);
            let d = 64;
            let want = elems(&layout, d);
            let (d, k_len, v_len) = match which {
                "head_dim" => (bad_d, want, want),
                "k" => (d, wrong_len(want, layout.total_rows(), x), want),
                _ => (d, want, wrong_len(want, layout.total_rows(), x)),
            };
            let (k, v) = (s.zeros::<bf16>(k_len).unwrap(), s.zeros::<bf16>(v_len).unwrap());
            p.call(invalid(which), || LayerCache::from_parts(&s, layout.clone(), d, k, v))?;
            Ok(())
        },
    );
}

fn cache_append(b: &mut Battery) {
    let which = prop_oneof![Just("k_new"), Just("v_new"), Just("full"), Just("head_dim")];
    b.run("LayerCache::append", 1_500, (cache_layout(), which, any::<u32>()), |p, (layout, which, x)| {
        let s = store(p);
        let d = 64;
        let n = layout.segments().len();
        let mut cache = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
        let want = n * d;
        let (k_len, v_len, expect) = match which {
            "k_new" => (wrong_len(want, n, x), want, invalid("k_new")),
            "v_new" => (want, wrong_len(want, n, x), invalid("v_new")),
            // New tokens sized for head_dim 128 on a head_dim 64 cache.
            "head_dim" => (n * 128, n * 128, invalid("k_new")),
            _ => {
                let first_full = layout.segments().iter().position(|s| s.is_full());
                match first_full {
                    Some(i) => (want, want, Expect::SegmentFull(i)),
                    None => return Ok(()),
                }
            }
        };
        let (kn, vn) = (s.zeros::<bf16>(k_len).unwrap(), s.zeros::<bf16>(v_len).unwrap());
        p.call(expect, || cache.append(&kn, &vn))?;
        check(cache.layout() == &layout, || "a failed append changed the layout".into())?;
        Ok(())
    });
    b.controls("LayerCache::append", |p| {
        // Controls: a valid append launches once and advances every segment.
        let s = store(p);
        let layout =
            LayoutBuilder::new(2, 2).full(0, 0, 1).streaming(1, 1, 1, 2).headroom(2).build().unwrap();
        let mut cache = LayerCache::<_, bf16>::new(&s, layout, 64).unwrap();
        let t = s.upload(&vec![bf16::ONE; 4 * 64]).unwrap();
        let before = p.launches.get();
        p.call(Expect::Ok, || cache.append(&t, &t))?;
        check(p.launches.get() == before + 1, || "a valid append did not launch exactly once".into())?;
        let lens: Vec<u32> = cache.layout().segments().iter().map(|s| s.len).collect();
        check(lens == [2, 1, 1, 1], || format!("lens {lens:?}"))
    });
}

fn cache_regrow(b: &mut Battery) {
    let headroom = prop_oneof![(0u32..1 << 20).prop_map(|x| u32::MAX - x), (MAX_ROWS as u32)..=u32::MAX];
    b.run("LayerCache::regrow", 1_000, (cache_layout(), headroom), |p, (layout, headroom)| {
        let s = store(p);
        let mut cache = LayerCache::<_, bf16>::new(&s, layout.clone(), 64).unwrap();
        // Every table here has a Full segment or rows enough that MAX_ROWS more overflow.
        let has_full = layout.segments().iter().any(|s| s.mode == SegmentMode::Full);
        if !has_full {
            return Ok(());
        }
        p.call(invalid("headroom"), || cache.regrow(headroom))?;
        check(cache.layout() == &layout, || "a failed regrow changed the layout".into())
    });
    b.controls("LayerCache::regrow", |p| {
        let s = store(p);
        let layout = LayoutBuilder::new(1, 2).full(0, 0, 3).streaming(0, 1, 1, 2).build().unwrap();
        let mut cache = LayerCache::<_, bf16>::new(&s, layout, 64).unwrap();
        p.call(Expect::Ok, || cache.regrow(5))?;
        check(cache.layout().segments()[0].capacity == 8, || format!("{:?}", cache.layout()))
    });
}

fn cache_relayout_into(b: &mut Battery) {
    let which = prop_oneof![Just("target"), Just("segment"), Just("k_dst"), Just("v_dst")];
    b.run(
        "LayerCache::relayout_into",
        1_500,
        (cache_layout(), which, any::<u32>()),
        |p, (layout, which, x)| {
            let s = store(p);
            let d = 64;
            let cache = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
            let mut target = layout.regrown(1 + x % 3).unwrap();
            let want = elems(&target, d);
            let (mut k_len, mut v_len) = (want, want);
            let expect = match which {
                "target" => {
                    // Same segments, other grid: (batch, kv_heads) swapped or flattened.
                    let (bt, kv) = (layout.batch(), layout.kv_heads());
                    let (nb, nk) = if bt != kv { (kv, bt) } else { (1, bt * kv) };
                    if (nb, nk) == (bt, kv) {
                        return Ok(());
                    }
                    let segs = target.segments().to_vec();
                    target = LayerLayout::new(nb, nk, target.total_rows() as u64, segs).unwrap();
                    invalid("target")
                }
                "segment" => {
                    // One Full segment holding one more token than the cache's.
                    let Some(i) = target
                        .segments()
                        .iter()
                        .position(|s| s.mode == SegmentMode::Full && s.len < s.capacity)
                    else {
                        return Ok(());
                    };
                    let mut segs = target.segments().to_vec();
                    segs[i].len += 1;
                    target =
                        LayerLayout::new(target.batch(), target.kv_heads(), target.total_rows() as u64, segs)
                            .unwrap();
                    invalid(format!("target.segments[{i}]"))
                }
                "k_dst" => {
                    k_len = wrong_len(want, target.total_rows(), x);
                    invalid("k_dst")
                }
                _ => {
                    v_len = wrong_len(want, target.total_rows(), x);
                    invalid("v_dst")
                }
            };
            let (mut k, mut v) = (s.zeros::<bf16>(k_len).unwrap(), s.zeros::<bf16>(v_len).unwrap());
            p.call(expect, || cache.relayout_into(&target, &mut k, &mut v))?;
            Ok(())
        },
    );
}

#[derive(Clone, Debug)]
enum AttentionFault {
    GroupSize(usize),
    Q(u32),
    Out(u32),
    Lse(u32),
    Scale(f32),
    ChunkTokens(u32),
    QForOtherHeadDim,
}

fn cache_attention(b: &mut Battery) {
    let fault = prop_oneof![
        prop_oneof![Just(0usize), MAX_GROUP + 1..200, Just(usize::MAX)].prop_map(AttentionFault::GroupSize),
        any::<u32>().prop_map(AttentionFault::Q),
        any::<u32>().prop_map(AttentionFault::Out),
        any::<u32>().prop_map(AttentionFault::Lse),
        prop::sample::select(vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::MAX,
            -f32::MAX,
            f32::MAX / 1.2
        ])
        .prop_map(AttentionFault::Scale),
        prop_oneof![Just(0u32), (i32::MAX as u32 + 1)..=u32::MAX].prop_map(AttentionFault::ChunkTokens),
        Just(AttentionFault::QForOtherHeadDim),
    ];
    b.run(
        "LayerCache::attention",
        2_500,
        (cache_layout(), 1usize..=MAX_GROUP, fault),
        |p, (layout, g, fault)| {
            let s = store(p);
            let d = 64;
            let cache = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
            let heads = layout.segments().len() * g;
            let (mut q_len, mut out_len, mut lse_len) = (heads * d, heads * d, Some(heads));
            let mut group = g;
            let mut opts = AttentionOptions::default();
            let expect = match fault {
                AttentionFault::GroupSize(bad) => {
                    group = bad;
                    invalid("group_size")
                }
                AttentionFault::Q(x) => {
                    q_len = wrong_len(q_len, heads, x);
                    invalid("q")
                }
                AttentionFault::Out(x) => {
                    out_len = wrong_len(out_len, heads, x);
                    invalid("out")
                }
                AttentionFault::Lse(x) => {
                    lse_len = Some(wrong_len(heads, 1, x));
                    invalid("lse")
                }
                AttentionFault::Scale(x) => {
                    opts.scale = Some(x);
                    invalid("scale")
                }
                AttentionFault::ChunkTokens(c) => {
                    opts.chunk_tokens = Some(c);
                    invalid("chunk_tokens")
                }
                AttentionFault::QForOtherHeadDim => {
                    q_len = heads * 128;
                    invalid("q")
                }
            };
            let q = s.zeros::<bf16>(q_len).unwrap();
            let mut out = s.zeros::<bf16>(out_len).unwrap();
            let mut lse = lse_len.map(|n| s.zeros::<f32>(n).unwrap());
            let mut ws = AttentionWorkspace::new();
            p.call(expect, || cache.attention(&q, group, &mut out, lse.as_mut(), &mut ws, &opts))?;
            Ok(())
        },
    );
    // More chunks than the grid's y dimension holds: a long segment split into 1-token chunks.
    let s = Counting(b.launches.clone());
    let long = 3 * MAX_SPLITS + 1;
    let layout = LayoutBuilder::new(1, 1).full(0, 0, long).build().unwrap();
    let cache = LayerCache::<_, bf16>::new(&s, layout, 64).unwrap();
    let q = s.zeros::<bf16>(64).unwrap();
    b.run("LayerCache::attention", 200, 1u32..=(long - 1) / MAX_SPLITS, |p, chunk| {
        let mut out = s.zeros::<bf16>(64).unwrap();
        let opts = AttentionOptions { chunk_tokens: Some(chunk), scale: None };
        let mut ws = AttentionWorkspace::new();
        p.call(invalid("chunk_tokens"), || cache.attention(&q, 1, &mut out, None, &mut ws, &opts))?;
        Ok(())
    });
    b.controls("LayerCache::attention", |p| {
        // Controls: valid calls launch (split: attention + merge) and write every output.
        let s = store(p);
        let layout = LayoutBuilder::new(1, 2).full(0, 0, 5).streaming(0, 1, 1, 2).build().unwrap();
        let cache = LayerCache::<_, bf16>::new(&s, layout, 64).unwrap();
        let q = s.upload(&vec![bf16::ONE; 2 * 2 * 64]).unwrap();
        let mut ws = AttentionWorkspace::new();
        for (chunk, launches) in [(None, 1), (Some(2), 2)] {
            let mut out = s.upload(&vec![bf16::NAN; 2 * 2 * 64]).unwrap();
            let mut lse = s.zeros::<f32>(4).unwrap();
            let opts = AttentionOptions { chunk_tokens: chunk, scale: None };
            let before = p.launches.get();
            p.call(Expect::Ok, || cache.attention(&q, 2, &mut out, Some(&mut lse), &mut ws, &opts))?;
            check(p.launches.get() == before + launches, || format!("{chunk:?}: not {launches} launch(es)"))?;
            let out = s.download(&out).unwrap();
            check(out.iter().all(|x| !x.is_nan()), || "an output was left unwritten".into())?;
        }
        Ok(())
    });
}

/// `attention_with_mass`: every fault of `attention` (the same checks run first) plus a mass
/// buffer of the wrong length.
fn cache_attention_with_mass(b: &mut Battery) {
    let fault = prop_oneof![
        prop_oneof![Just(0usize), MAX_GROUP + 1..200, Just(usize::MAX)]
            .prop_map(|g| Some(AttentionFault::GroupSize(g))),
        any::<u32>().prop_map(|x| Some(AttentionFault::Q(x))),
        any::<u32>().prop_map(|x| Some(AttentionFault::Out(x))),
        any::<u32>().prop_map(|x| Some(AttentionFault::Lse(x))),
        prop::sample::select(vec![f32::NAN, f32::INFINITY, 0.0, -0.0, f32::MAX])
            .prop_map(|x| Some(AttentionFault::Scale(x))),
        prop_oneof![Just(0u32), (i32::MAX as u32 + 1)..=u32::MAX]
            .prop_map(|c| Some(AttentionFault::ChunkTokens(c))),
        Just(Some(AttentionFault::QForOtherHeadDim)),
        Just(None),
    ];
    b.run(
        "LayerCache::attention_with_mass",
        2_500,
        (cache_layout(), 1usize..=MAX_GROUP, fault, any::<u32>(), any::<bool>()),
        |p, (layout, g, fault, x, with_lse)| {
            let s = store(p);
            let d = 64;
            let cache = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
            let heads = layout.segments().len() * g;
            let rows = layout.total_rows();
            let (mut q_len, mut out_len, mut lse_len) = (heads * d, heads * d, with_lse.then_some(heads));
            let mut mass_len = rows;
            let mut group = g;
            let mut opts = AttentionOptions::default();
            let expect = match fault {
                Some(AttentionFault::GroupSize(bad)) => {
                    group = bad;
                    invalid("group_size")
                }
                Some(AttentionFault::Q(x)) => {
                    q_len = wrong_len(q_len, heads, x);
                    invalid("q")
                }
                Some(AttentionFault::Out(x)) => {
                    out_len = wrong_len(out_len, heads, x);
                    invalid("out")
                }
                Some(AttentionFault::Lse(x)) => {
                    lse_len = Some(wrong_len(heads, 1, x));
                    invalid("lse")
                }
                Some(AttentionFault::Scale(x)) => {
                    opts.scale = Some(x);
                    invalid("scale")
                }
                Some(AttentionFault::ChunkTokens(c)) => {
                    opts.chunk_tokens = Some(c);
                    invalid("chunk_tokens")
                }
                Some(AttentionFault::QForOtherHeadDim) => {
                    q_len = heads * 128;
                    invalid("q")
                }
                None => {
                    mass_len = wrong_len(rows, 1, x);
                    invalid("mass")
                }
            };
            let q = s.zeros::<bf16>(q_len).unwrap();
            let mut out = s.zeros::<bf16>(out_len).unwrap();
            let mut lse = lse_len.map(|n| s.zeros::<f32>(n).unwrap());
            let mut mass = s.zeros::<f32>(mass_len).unwrap();
            let mut ws = AttentionWorkspace::new();
            p.call(expect, || {
                cache.attention_with_mass(&q, group, &mut out, lse.as_mut(), &mut ws, &opts, &mut mass)
            })?;
            Ok(())
        },
    );
    b.controls("LayerCache::attention_with_mass", |p| {
        // Controls: attention (+ merge when split) + the mass kernel; the tokens' mass grows by
        // their group's probabilities (G = 2 in all per non-empty segment), free rows untouched.
        let s = store(p);
        let layout =
            LayoutBuilder::new(1, 2).full(0, 0, 5).streaming(0, 1, 1, 2).headroom(1).build().unwrap();
        let cache = LayerCache::<_, bf16>::new(&s, layout.clone(), 64).unwrap();
        let q = s.upload(&vec![bf16::ONE; 2 * 2 * 64]).unwrap();
        let mut ws = AttentionWorkspace::new();
        for (chunk, with_lse, launches) in [(None, false, 2), (Some(2), true, 3)] {
            let mut out = s.zeros::<bf16>(2 * 2 * 64).unwrap();
            let mut lse = s.zeros::<f32>(4).unwrap();
            let mut mass = s.upload(&vec![1.0f32; layout.total_rows()]).unwrap();
            let opts = AttentionOptions { chunk_tokens: chunk, scale: None };
            let before = p.launches.get();
            p.call(Expect::Ok, || {
                cache.attention_with_mass(
                    &q,
                    2,
                    &mut out,
                    with_lse.then_some(&mut lse),
                    &mut ws,
                    &opts,
                    &mut mass,
                )
            })?;
            check(p.launches.get() == before + launches, || format!("{chunk:?}: not {launches} launch(es)"))?;
            let m = s.download(&mass).unwrap();
            for (i, seg) in layout.segments().iter().enumerate() {
                let added: f32 = (0..seg.len).map(|t| m[seg.row(t) as usize] - 1.0).sum();
                let want = if seg.len == 0 { 0.0 } else { 2.0 };
                check((added - want).abs() < 1e-5, || {
                    format!("segment {i}: mass grew by {added}, not {want}")
                })?;
            }
            let last = layout.segments()[0].offset as usize + 5; // segment 0's free row
            check(m[last] == 1.0, || "a free row's mass changed".into())?;
        }
        Ok(())
    });
}

fn emu_store(b: &mut Battery) {
    b.run("EmuStore", 1_000, (0usize..64, any::<u32>()), |p, (n, x)| {
        let mut buf = EmuStore.zeros::<bf16>(n).unwrap();
        let data = vec![bf16::ONE; wrong_len(n, 1, x)];
        p.call(invalid("data"), || EmuStore.overwrite(&mut buf, &data))?;
        // Sizes whose bytes overflow the address space.
        let huge = usize::MAX / 2 - (x as usize % 16);
        p.call(invalid("len"), || EmuStore.zeros::<bf16>(huge))?;
        Ok(())
    });
}

#[cfg(feature = "cuda")]
fn gpu_store_new(b: &mut Battery) {
    // No machine has this many devices: NoGpu on a GPU machine, NoGpu or NoKernels elsewhere.
    b.run("GpuStore::new", 20, prop_oneof![1usize << 20..usize::MAX, Just(usize::MAX)], |p, ordinal| {
        p.call(Expect::NoDevice, || GpuStore::new(ordinal))?;
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Prefill compression (`select`), emulator store counting launches.

/// A valid prompt shape, options and budgets for `select::compress`; buffer lengths are held
/// separately so a fault can break one of them.
#[derive(Clone, Debug)]
struct SelCase {
    batch: usize,
    kv_heads: usize,
    group: usize,
    q_len: usize,
    head_dim: usize,
    opts: SelectOptions,
    budgets: SelBudgets,
    k_len: usize,
    v_len: usize,
    queries_len: usize,
}

#[derive(Clone, Debug)]
enum SelBudgets {
    PerRow(Vec<u32>),
    AdaKv { base: u32, floor_alpha: f32 },
}

impl SelCase {
    fn rows_per_sequence(&self) -> usize {
        match self.opts.granularity {
            Granularity::KvHead => self.kv_heads,
            Granularity::QueryHead => self.kv_heads * self.group,
        }
    }
    fn rows(&self) -> usize {
        self.batch * self.rows_per_sequence()
    }
    /// Tokens row `r` keeps at least (AdaKV: the window; it may keep up to `q_len`).
    fn least_kept(&self, r: usize) -> u32 {
        match &self.budgets {
            SelBudgets::PerRow(b) => b[r].min(self.q_len as u32),
            SelBudgets::AdaKv { .. } => self.opts.window as u32,
        }
    }
    /// Tokens row `r` may keep at most.
    fn most_kept(&self, r: usize) -> u32 {
        match &self.budgets {
            SelBudgets::PerRow(b) => b[r].min(self.q_len as u32),
            SelBudgets::AdaKv { .. } => self.q_len as u32,
        }
    }
    fn budgets(&self) -> Budgets<'_> {
        match &self.budgets {
            SelBudgets::PerRow(b) => Budgets::PerRow(b),
            &SelBudgets::AdaKv { base, floor_alpha } => Budgets::AdaKv { base, floor_alpha },
        }
    }
    /// Per-row budgets, valid for this shape (replacing AdaKV's).
    fn per_row(&mut self, x: u32) {
        if let SelBudgets::AdaKv { .. } = self.budgets {
            let w = self.opts.window as u32;
            self.budgets = SelBudgets::PerRow((0..self.rows() as u32).map(|r| w + (x + r) % 7).collect());
        }
    }
    /// Buffers of the lengths held, and the call's prompt over them.
    fn bufs(&self, s: &Counting) -> [EmuBuf<bf16>; 3] {
        [self.k_len, self.v_len, self.queries_len].map(|n| s.zeros::<bf16>(n).unwrap())
    }
    fn prompt<'a>(&self, b: &'a [EmuBuf<bf16>; 3]) -> Prompt<'a, Counting, bf16> {
        Prompt {
            k: &b[0],
            v: &b[1],
            queries: &b[2],
            batch: self.batch,
            kv_heads: self.kv_heads,
            group_size: self.group,
            q_len: self.q_len,
            head_dim: self.head_dim,
            packing: Default::default(),
        }
    }
}

fn sel_case() -> impl Strategy<Value = SelCase> {
    let shape =
        (1usize..=2, 1usize..=3, 1usize..=4, 1usize..=24, prop::sample::select(SUPPORTED_HEAD_DIMS.to_vec()));
    let opts = (
        any::<u32>(),
        any::<u32>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(None), (0.01f32..10.0).prop_map(Some), (-10.0f32..-0.01).prop_map(Some)],
        0u32..4,
        prop_oneof![Just(None), (1u32..30).prop_map(Some)],
    );
    let budgets = (any::<bool>(), prop::collection::vec(0u32..30, 24), any::<u32>(), 0.0f32..=1.0);
    (shape, opts, budgets).prop_map(|((batch, kv_heads, group, q, d), o, (ada, per_row, base, alpha))| {
        let (ws, ps, avg, gmax, per_qh, scale, headroom, chunk_tokens) = o;
        let window = 1 + ws as usize % q;
        let opts = SelectOptions {
            window,
            pool_kernel: 2 * (ps as usize % q.div_ceil(2)) + 1,
            pool: if avg { Pool::Avg } else { Pool::Max },
            gqa: if gmax { GqaReduce::Max } else { GqaReduce::Mean },
            granularity: if per_qh { Granularity::QueryHead } else { Granularity::KvHead },
            scale,
            // The queries' faults below are faults of SnapKV scoring.
            score: Score::SnapKv,
            sink: 0,
            headroom,
            chunk_tokens,
        };
        let rows = batch * kv_heads * if per_qh { group } else { 1 };
        let budgets = if ada {
            SelBudgets::AdaKv { base: (window + base as usize % (q + 5)) as u32, floor_alpha: alpha }
        } else {
            SelBudgets::PerRow(per_row[..rows].iter().map(|&x| window as u32 + x).collect())
        };
        let kv = batch * kv_heads * q * d;
        SelCase {
            batch,
            kv_heads,
            group,
            q_len: q,
            head_dim: d,
            opts,
            budgets,
            k_len: kv,
            v_len: kv,
            queries_len: batch * kv_heads * group * window * d,
        }
    })
}

#[derive(Clone, Debug)]
enum SelFault {
    HeadDim(usize),
    BatchZero,
    KvHeadsZero,
    GroupSize(usize),
    QLenZero,
    WindowZero,
    WindowAboveQ(u32),
    PoolEven(usize),
    PoolAboveQ(u32),
    K(u32),
    V(u32),
    Queries(u32),
    QueriesOfOtherWindow(u32),
    BudgetCount(bool),
    BudgetBelowWindow(usize, u32),
    AdaBaseBelowWindow(u32),
    AdaBaseHuge(u32),
    AdaFloorAlpha(f32),
    Scale(f32),
    ChunkZero,
    Headroom(u32),
    SegmentsAboveMaxRows(u8, u32),
    RowsTimesQ(bool, u32),
    QueryRowsAboveMaxRows(u32),
}

fn sel_fault() -> impl Strategy<Value = SelFault> {
    let x = any::<u32>();
    prop_oneof![
        bad_head_dim().prop_map(SelFault::HeadDim),
        Just(SelFault::BatchZero),
        Just(SelFault::KvHeadsZero),
        prop_oneof![Just(0usize), MAX_SELECT_GROUP + 1..200, Just(usize::MAX)].prop_map(SelFault::GroupSize),
        Just(SelFault::QLenZero),
        Just(SelFault::WindowZero),
        x.prop_map(SelFault::WindowAboveQ),
        prop_oneof![(0usize..40).prop_map(|k| 2 * k), Just(usize::MAX - 1)].prop_map(SelFault::PoolEven),
        x.prop_map(SelFault::PoolAboveQ),
        x.prop_map(SelFault::K),
        x.prop_map(SelFault::V),
        x.prop_map(SelFault::Queries),
        x.prop_map(SelFault::QueriesOfOtherWindow),
        any::<bool>().prop_map(SelFault::BudgetCount),
        (0usize..48, x).prop_map(|(i, x)| SelFault::BudgetBelowWindow(i, x)),
        x.prop_map(SelFault::AdaBaseBelowWindow),
        x.prop_map(SelFault::AdaBaseHuge),
        prop::sample::select(vec![
            f32::NAN,
            -f32::NAN,
            -0.1,
            -1e-7,
            1.0 + f32::EPSILON,
            1.5,
            f32::INFINITY,
            -f32::INFINITY,
            f32::MAX
        ])
        .prop_map(SelFault::AdaFloorAlpha),
        prop::sample::select(vec![
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -f32::MAX,
            3.0e38,
            -2.4e38
        ])
        .prop_map(SelFault::Scale),
        Just(SelFault::ChunkZero),
        x.prop_map(SelFault::Headroom),
        (0u8..3, x).prop_map(|(k, x)| SelFault::SegmentsAboveMaxRows(k, x)),
        (any::<bool>(), x).prop_map(|(o, x)| SelFault::RowsTimesQ(o, x)),
        x.prop_map(SelFault::QueryRowsAboveMaxRows),
    ]
}

/// Breaks `c` in the one way `fault` says and returns what `compress` must report (`None` for
/// a fault that does not apply to `compress_into`, which has no headroom).
fn apply_sel(c: &mut SelCase, fault: &SelFault, into: bool) -> Option<Expect> {
    let q = c.q_len;
    let w = c.opts.window;
    let rows = c.rows();
    Some(match *fault {
        SelFault::HeadDim(d) => {
            c.head_dim = d;
            invalid("head_dim")
        }
        SelFault::BatchZero => {
            c.batch = 0;
            invalid("batch")
        }
        SelFault::KvHeadsZero => {
            c.kv_heads = 0;
            invalid("kv_heads")
        }
        SelFault::GroupSize(g) => {
            c.group = g;
            invalid("group_size")
        }
        SelFault::QLenZero => {
            c.q_len = 0;
            invalid("q_len")
        }
        SelFault::WindowZero => {
            c.opts.window = 0;
            invalid("window")
        }
        SelFault::WindowAboveQ(x) => {
            c.opts.window = if x % 5 == 0 { usize::MAX } else { q + 1 + x as usize % 100 };
            invalid("window")
        }
        SelFault::PoolEven(k) => {
            c.opts.pool_kernel = k;
            invalid("pool_kernel")
        }
        SelFault::PoolAboveQ(x) => {
            c.opts.pool_kernel = if x % 5 == 0 { usize::MAX } else { (q + 1 + x as usize % 50) | 1 };
            invalid("pool_kernel")
        }
        SelFault::K(x) => {
            c.k_len = wrong_len(c.k_len, c.batch * c.kv_heads * q, x);
            invalid("k")
        }
        SelFault::V(x) => {
            c.v_len = wrong_len(c.v_len, c.batch * c.kv_heads * q, x);
            invalid("v")
        }
        SelFault::Queries(x) => {
            c.queries_len = wrong_len(c.queries_len, c.batch * c.kv_heads * c.group * w, x);
            invalid("queries")
        }
        SelFault::QueriesOfOtherWindow(x) => {
            // A valid window the queries were not written for (budgets, checked later, may be
            // below it).
            if q >= 2 {
                c.opts.window = 1 + (w + x as usize % (q - 1)) % q;
                c.opts.pool_kernel = 1;
            } else {
                c.queries_len += 1 + x as usize % 64;
            }
            invalid("queries")
        }
        SelFault::BudgetCount(add) => {
            let mut b: Vec<u32> = (0..rows).map(|r| c.least_kept(r).max(w as u32)).collect();
            if add {
                b.push(w as u32);
            } else {
                b.pop();
            }
            c.budgets = SelBudgets::PerRow(b);
            invalid("budgets")
        }
        SelFault::BudgetBelowWindow(i, x) => {
            c.per_row(x);
            let i = i % rows;
            if let SelBudgets::PerRow(b) = &mut c.budgets {
                b[i] = x % w as u32;
            }
            invalid(format!("budgets[{i}]"))
        }
        SelFault::AdaBaseBelowWindow(x) => {
            c.budgets = SelBudgets::AdaKv { base: x % w as u32, floor_alpha: 0.2 };
            invalid("budgets.base")
        }
        SelFault::AdaBaseHuge(x) => {
            // rows_per_sequence * (base - window) beyond int32 rows.
            let rps = c.rows_per_sequence() as u64;
            let least = (MAX_ROWS / rps + 1 + w as u64) as u32;
            c.budgets = SelBudgets::AdaKv {
                base: least.saturating_add(x % (u32::MAX - least + 1)),
                floor_alpha: 0.5,
            };
            invalid("budgets.base")
        }
        SelFault::AdaFloorAlpha(a) => {
            c.budgets = SelBudgets::AdaKv { base: w as u32 + 3, floor_alpha: a };
            invalid("budgets.floor_alpha")
        }
        SelFault::Scale(s) => {
            c.opts.scale = Some(s);
            invalid("scale")
        }
        SelFault::ChunkZero => {
            c.opts.chunk_tokens = Some(0);
            invalid("chunk_tokens")
        }
        SelFault::Headroom(x) => {
            if into {
                return None;
            }
            // Every row keeps at least one token: rows * (1 + MAX_ROWS / rows) > MAX_ROWS.
            c.opts.headroom = (MAX_ROWS / rows as u64) as u32 + x % 1000;
            invalid("headroom")
        }
        SelFault::SegmentsAboveMaxRows(kind, x) => {
            let x = x as usize % 1000;
            match kind {
                // batch * kv_heads past int32 rows, or past usize.
                0 => (c.batch, c.kv_heads) = (1 << 16, (1 << 15) + x),
                1 => (c.batch, c.kv_heads) = (usize::MAX - x, 2),
                // Per query head: batch * kv_heads fits, times G does not.
                _ => {
                    (c.batch, c.kv_heads, c.group) = (1 << 8, (1 << 20) + x, 16);
                    c.opts.granularity = Granularity::QueryHead;
                }
            }
            invalid("batch")
        }
        SelFault::RowsTimesQ(overflow, x) => {
            if overflow {
                c.q_len = usize::MAX - x as usize % 1000;
            } else {
                (c.kv_heads, c.q_len) = ((1 << 20) + x as usize % 1000, 1 << 12);
            }
            invalid("q_len")
        }
        SelFault::QueryRowsAboveMaxRows(x) => {
            // segments * q_len fits (per KV head), segments * G * window does not.
            (c.batch, c.kv_heads, c.q_len, c.group) = (1, 1 << 20, 1 << 10, 2 + x as usize % 15);
            c.opts.granularity = Granularity::KvHead;
            (c.opts.window, c.opts.pool_kernel) = (1 << 10, 1);
            invalid("window")
        }
    })
}

fn select_compress(b: &mut Battery) {
    b.run("select::compress", 8_000, (sel_case(), sel_fault()), |p, (mut c, fault)| {
        let Some(expect) = apply_sel(&mut c, &fault, false) else { return Ok(()) };
        let s = store(p);
        let bufs = c.bufs(&s);
        let mut ws = SelectWorkspace::new();
        p.call(expect, || compress(&s, &c.prompt(&bufs), c.budgets(), &c.opts, &mut ws))?;
        check(ws.kept(&s).is_err(), || "a refused compress left a selection in the workspace".into())
    });
    // More than 65535 chunks: one long prompt (131071 tokens) split into 1- or 2-token chunks.
    let s = Counting(b.launches.clone());
    let (q, d, w) = (2 * 65535 + 1, 64, 4);
    let kv = s.zeros::<bf16>(q * d).unwrap();
    let queries = s.zeros::<bf16>(w * d).unwrap();
    let prompt = Prompt::<Counting, bf16> {
        k: &kv,
        v: &kv,
        queries: &queries,
        batch: 1,
        kv_heads: 1,
        group_size: 1,
        q_len: q,
        head_dim: d,
        packing: Default::default(),
    };
    let chunks = (1u32..=2, any::<bool>(), 0u32..100);
    b.run("select::compress", 100, chunks, |p, (chunk, ada, x)| {
        let opts = SelectOptions { window: w, chunk_tokens: Some(chunk), ..SelectOptions::default() };
        let per_row = [w as u32 + x];
        let budgets = if ada {
            Budgets::AdaKv { base: w as u32 + x, floor_alpha: 0.2 }
        } else {
            Budgets::PerRow(&per_row)
        };
        let mut ws = SelectWorkspace::new();
        p.call(invalid("chunk_tokens"), || compress(&s, &prompt, budgets, &opts, &mut ws))?;
        Ok(())
    });
    b.controls("select::compress", |p| {
        // Controls: valid compressions (per KV head with per-row budgets, per query head with
        // AdaKV) launch and keep min(budget, q) rows per segment.
        let s = store(p);
        let (q, d, g, w) = (40, 64, 2, 8);
        let data =
            |n: usize| s.upload(&(0..n).map(|i| bf16::from_f32((i % 13) as f32 / 7.0)).collect::<Vec<_>>());
        let (k, v, queries) =
            (data(2 * q * d).unwrap(), data(2 * q * d).unwrap(), data(2 * g * w * d).unwrap());
        let prompt = Prompt::<Counting, bf16> {
            k: &k,
            v: &v,
            queries: &queries,
            batch: 1,
            kv_heads: 2,
            group_size: g,
            q_len: q,
            head_dim: d,
            packing: Default::default(),
        };
        let mut ws = SelectWorkspace::new();
        let opts = SelectOptions { window: w, pool_kernel: 5, headroom: 2, ..SelectOptions::default() };
        let before = p.launches.get();
        let c = p.call(Expect::Ok, || compress(&s, &prompt, Budgets::PerRow(&[12, 60]), &opts, &mut ws))?;
        let c = c.expect("Ok");
        check(p.launches.get() > before, || "a valid compress did not launch".into())?;
        let lens: Vec<(u32, u32)> = c.layout().segments().iter().map(|s| (s.len, s.capacity)).collect();
        check(lens == [(12, 14), (40, 42)], || format!("(len, capacity) {lens:?}"))?;
        let per_qh = SelectOptions { granularity: Granularity::QueryHead, ..opts };
        let ada = Budgets::AdaKv { base: 16, floor_alpha: 0.2 };
        let c = p.call(Expect::Ok, || compress(&s, &prompt, ada, &per_qh, &mut ws))?.expect("Ok");
        let segs = c.layout().segments();
        check(segs.len() == 4 && segs.iter().all(|s| (w as u32..=q as u32).contains(&s.len)), || {
            format!("{segs:?}")
        })
    });
}

#[derive(Clone, Debug)]
enum DestFault {
    HeadDim(usize),
    Count(u32),
    Streaming(usize),
    Capacity(usize, u32),
}

/// A destination for `c` (one `Full` segment per score row, room for what the row may keep,
/// gaps and stale lengths), broken as `fault` says; and what `compress_into` must report.
fn sel_dest(c: &mut SelCase, fault: Option<&DestFault>, x: u32) -> (LayerLayout, usize, Option<Expect>) {
    let (mut batch, mut rps, mut d) = (c.batch, c.rows_per_sequence(), c.head_dim);
    let mut expect = None;
    let mut streaming = None;
    let mut short = None;
    match fault {
        None => {}
        Some(&DestFault::HeadDim(k)) => {
            d = SUPPORTED_HEAD_DIMS
                [(SUPPORTED_HEAD_DIMS.iter().position(|&s| s == d).unwrap() + 1 + k % 2) % 3];
            expect = Some(invalid("dest.head_dim"));
        }
        Some(&DestFault::Count(k)) => {
            // Another grid: one more sequence or head, one head fewer, or the other granularity.
            match k % 4 {
                0 => batch += 1,
                1 => rps += 1,
                2 if rps > 1 => rps -= 1,
                _ if c.group > 1 => {
                    rps = match c.opts.granularity {
                        Granularity::KvHead => c.kv_heads * c.group,
                        Granularity::QueryHead => c.kv_heads,
                    }
                }
                _ => rps += 2,
            }
            expect = Some(invalid("dest.layout"));
        }
        Some(&DestFault::Streaming(i)) => {
            let i = i % c.rows();
            streaming = Some(i);
            expect = Some(invalid(format!("dest.segments[{i}].mode")));
        }
        Some(&DestFault::Capacity(i, _)) => {
            c.per_row(x);
            let i = i % c.rows();
            short = Some(i);
            expect = Some(invalid(format!("dest.segments[{i}].capacity")));
        }
    }
    let mut segs = Vec::new();
    let mut off = 0u32;
    for r in 0..batch * rps {
        off += (x >> (r % 8)) % 3;
        let need = if r < c.rows() { c.most_kept(r) } else { 4 };
        let mut s = if streaming == Some(r) {
            Segment::streaming(off, 1, need)
        } else {
            let cap = match (short, fault) {
                (Some(i), Some(&DestFault::Capacity(_, y))) if i == r => y % need,
                _ => need + (x >> (r % 16)) % 4,
            };
            Segment::full(off, cap, 0)
        };
        if s.mode == SegmentMode::Full {
            s.len = (x >> (r % 16)) % (s.capacity + 1);
        }
        off += s.capacity;
        segs.push(s);
    }
    let layout = LayerLayout::new(batch, rps, u64::from(off) + u64::from(x % 5), segs).unwrap();
    (layout, d, expect)
}

/// Packed prompts (`Packing::Varlen`): a valid prompt of mixed lengths, or one fault at a time
/// in the offsets (count, first entry, a decreasing entry, a sequence shorter than the window,
/// q_len not the longest) or in a buffer's length; the field named must be the fault's.
fn select_compress_packed(b: &mut Battery) {
    use headwise::select::Packing;
    b.run(
        "select::compress (packed, cu_seqlens)",
        1_000,
        (
            (1usize..4, 1usize..3, prop_oneof![Just(1usize), Just(2), Just(4)], 1usize..8),
            prop::collection::vec(0usize..30, 3),
            prop_oneof![3 => Just(None), 1 => (0u8..8, 1usize..4).prop_map(Some)],
        ),
        |p, ((batch, kv_heads, group, window), extra, fault)| {
            let s = store(p);
            let d = 64;
            let mut lens: Vec<usize> = (0..batch).map(|b| window + extra[b]).collect();
            let mut q_len = *lens.iter().max().unwrap();
            let mut expect = Expect::Ok;
            let mut kv_delta = [0usize; 2];
            let mut q_delta = 0usize;
            let mut cu: Vec<u32> = std::iter::once(0)
                .chain(lens.iter().scan(0u32, |a, &l| {
                    *a += l as u32;
                    Some(*a)
                }))
                .collect();
            match fault {
                None => {}
                Some((0, delta)) => {
                    cu.extend(std::iter::repeat_n(*cu.last().unwrap(), delta));
                    expect = invalid("cu_seqlens");
                }
                Some((1, delta)) => {
                    for c in cu.iter_mut() {
                        *c += delta as u32;
                    }
                    expect = invalid("cu_seqlens[0]");
                }
                Some((2, delta)) if batch > 1 => {
                    // Sequence 1 ends before it starts.
                    cu[2] = cu[1].saturating_sub(delta as u32);
                    expect = invalid("cu_seqlens[2]");
                }
                Some((3, _)) if window > 1 => {
                    lens[batch - 1] = window - 1;
                    cu[batch] = cu[batch - 1] + lens[batch - 1] as u32;
                    q_len = *lens.iter().max().unwrap();
                    expect = if q_len < window {
                        invalid("window")
                    } else {
                        invalid(format!("cu_seqlens[{batch}]"))
                    };
                }
                Some((4, delta)) => {
                    q_len += delta;
                    expect = invalid("q_len");
                }
                Some((5, delta)) => {
                    kv_delta[0] = delta;
                    expect = invalid("k");
                }
                Some((6, delta)) => {
                    kv_delta[1] = delta;
                    expect = invalid("v");
                }
                Some((_, delta)) => {
                    q_delta = delta;
                    expect = invalid("queries");
                }
            }
            let total = *cu.last().unwrap() as usize;
            let kv = total * kv_heads * d;
            let (k, v, q) = (
                s.zeros::<bf16>(kv + kv_delta[0]).unwrap(),
                s.zeros::<bf16>(kv + kv_delta[1]).unwrap(),
                s.zeros::<bf16>(total * kv_heads * group * d + q_delta).unwrap(),
            );
            let prompt = Prompt {
                k: &k,
                v: &v,
                queries: &q,
                batch,
                kv_heads,
                group_size: group,
                q_len,
                head_dim: d,
                packing: Packing::Varlen { cu_seqlens: &cu },
            };
            let opts = SelectOptions { window, pool_kernel: 1, ..SelectOptions::default() };
            let budgets = vec![window as u32 + 3; batch * kv_heads];
            let mut ws = SelectWorkspace::new();
            p.call(expect, || compress(&s, &prompt, Budgets::PerRow(&budgets), &opts, &mut ws).map(|_| ()))?;
            Ok(())
        },
    );
}

/// Attention sinks and threshold keep: a valid KNorm prompt, sinks up to past q_len, per-row
/// budgets around window + sink, thresholds including NaN and the infinities; the field named
/// must be the fault's (sink first, then the budgets).
fn select_sinks_threshold(b: &mut Battery) {
    b.run(
        "select::compress (sinks, threshold)",
        1_000,
        (
            (1usize..3, 1usize..30, 1usize..6, 0usize..34),
            prop_oneof![
                2 => prop::collection::vec(0u32..40, 1..3).prop_map(Some),
                1 => Just(None),
            ],
            prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY), -2.0f32..2.0],
        ),
        |p, ((kv_heads, q, window, sink), per_row, threshold)| {
            let s = store(p);
            let (d, window) = (64, 1 + (window - 1) % q);
            let (k, none) = (s.zeros::<bf16>(kv_heads * q * d).unwrap(), s.zeros::<bf16>(0).unwrap());
            let prompt = Prompt {
                k: &k,
                v: &k,
                queries: &none,
                batch: 1,
                kv_heads,
                group_size: 1,
                q_len: q,
                head_dim: d,
                packing: Default::default(),
            };
            let opts = SelectOptions {
                window,
                pool_kernel: 1,
                sink,
                score: Score::KeyNorm,
                ..SelectOptions::default()
            };
            let rows: Vec<u32> = match &per_row {
                Some(v) => (0..kv_heads).map(|r| v[r % v.len()]).collect(),
                None => Vec::new(),
            };
            let (budgets, expect) = match per_row {
                Some(_) => {
                    let low = rows.iter().position(|&x| (x as usize) < window + sink);
                    let e = if sink > q {
                        invalid("sink")
                    } else if let Some(i) = low {
                        invalid(format!("budgets[{i}]"))
                    } else {
                        Expect::Ok
                    };
                    (Budgets::PerRow(&rows), e)
                }
                None => {
                    let e = if sink > q {
                        invalid("sink")
                    } else if threshold.is_nan() {
                        invalid("budgets.threshold")
                    } else {
                        Expect::Ok
                    };
                    (Budgets::Threshold(threshold), e)
                }
            };
            let mut ws = SelectWorkspace::new();
            p.call(expect, || compress(&s, &prompt, budgets, &opts, &mut ws).map(|_| ()))?;
            Ok(())
        },
    );
}

/// Expected Attention scores: shapes, lengths of every buffer, window, sink and epsilon out of
/// range, one fault at a time or none; a valid call launches and the two kernels run.
fn scores_expected_attention(b: &mut Battery) {
    use headwise::scores::{ExpectedAttention, ScoreWorkspace, expected_attention};
    let shape = (
        1usize..3,
        1usize..3,
        prop_oneof![4 => 1usize..5, 1 => Just(0usize), 1 => 17usize..20],
        1usize..24,
        prop_oneof![Just(64usize), Just(128), Just(96)],
    );
    let fault = prop_oneof![4 => Just(None), 1 => (0u8..8, 1usize..5).prop_map(Some)];
    b.run(
        "scores::expected_attention",
        1_000,
        (shape, 0usize..30, 0usize..30, fault),
        |p, ((batch, kv_heads, group, q, d), window, sink, fault)| {
            let s = store(p);
            let segments = batch * kv_heads;
            let window = 1 + window % q;
            let sink = sink % q;
            let n = q - window;
            let (mut kv, mut mean, mut cov, mut out) =
                (segments * q * d, segments * group * d, segments * group * d * d, segments * n);
            let mut o = ExpectedAttention { sink, ..ExpectedAttention::default() };
            let mut win = window;
            // The expected field when the shape itself is fine and one fault is planted.
            let planted = fault.map(|(f, delta)| match f {
                0 => {
                    kv += delta;
                    "k"
                }
                1 => {
                    mean += delta;
                    "mean"
                }
                2 => {
                    cov += delta;
                    "cov"
                }
                3 => {
                    out += delta;
                    "scores"
                }
                4 => {
                    win = 0;
                    "window"
                }
                5 => {
                    win = q + delta;
                    "window"
                }
                6 => {
                    o.sink = q + delta - 1;
                    "sink"
                }
                _ => {
                    o.epsilon = f32::INFINITY;
                    "epsilon"
                }
            });
            let shape_fault = if ![64, 128, 256].contains(&d) {
                Some("head_dim")
            } else if group == 0 || group > 16 {
                Some("group_size")
            } else {
                None
            };
            let expect = match (shape_fault, planted) {
                (Some(f), _) => invalid(f),
                (None, Some(f)) => invalid(f),
                (None, None) => Expect::Ok,
            };
            let (kb, vb, none) = (
                s.zeros::<bf16>(kv).unwrap(),
                s.zeros::<bf16>(segments * q * d).unwrap(),
                s.zeros::<bf16>(0).unwrap(),
            );
            let prompt = Prompt {
                k: &kb,
                v: &vb,
                queries: &none,
                batch,
                kv_heads,
                group_size: group,
                q_len: q,
                head_dim: d,
                packing: Default::default(),
            };
            let (mb, cb) = (s.zeros::<f32>(mean).unwrap(), s.zeros::<f32>(cov).unwrap());
            let mut ob = s.zeros::<f32>(out).unwrap();
            let mut ws = ScoreWorkspace::new();
            p.call(expect, || expected_attention(&s, &prompt, &mb, Some(&cb), win, &o, &mut ob, &mut ws))?;
            Ok(())
        },
    );
}

/// The scores primitive: a valid prompt and destination, given scores of the right length or
/// not, with either computed score in the options (ignored): the Rust outcome of the same call
/// with SnapKV scoring is the expectation, except that the scores' length is checked too.
fn select_compress_into_scored(b: &mut Battery) {
    b.run(
        "select::compress_into_scored",
        300,
        (sel_case(), any::<u32>(), prop_oneof![3 => Just(0i64), 1 => -3i64..4]),
        |p, (mut c, x, delta)| {
            let s = store(p);
            let (layout, d, _) = sel_dest(&mut c, None, x);
            let mut dest = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
            let bufs = c.bufs(&s);
            let rows =
                c.batch * c.kv_heads * if c.opts.granularity == Granularity::QueryHead { c.group } else { 1 };
            let n = c.q_len.saturating_sub(c.opts.window);
            let len = ((rows * n) as i64 + delta).max(0) as usize;
            let scores = s.upload(&vec![0.25f32; len]).unwrap();
            // The same call with SnapKV's own scores, on a copy of the destination, names the
            // shape faults; the queries are not read here, so their faults do not count.
            let queries_ok = SelCase {
                queries_len: c.batch * c.kv_heads * c.group * c.opts.window * c.head_dim,
                ..c.clone()
            };
            let plain = Counting(Rc::new(Cell::new(0)));
            let mut probe_dest = LayerCache::<_, bf16>::new(&plain, layout.clone(), d).unwrap();
            let pb = queries_ok.bufs(&plain);
            let rust = compress_into(
                &mut probe_dest,
                &queries_ok.prompt(&pb),
                c.budgets(),
                &c.opts,
                &mut SelectWorkspace::new(),
            );
            let expect = match rust {
                Ok(()) if len == rows * n => Expect::Ok,
                Ok(()) => invalid("scores"),
                Err(Error::Invalid { field, .. }) => Expect::Invalid(field),
                Err(e) => return Err(TestCaseError::fail(format!("the SnapKV probe failed otherwise: {e}"))),
            };
            let mut ws = SelectWorkspace::new();
            p.call(expect, || {
                compress_into_scored(&mut dest, &c.prompt(&bufs), &scores, c.budgets(), &c.opts, &mut ws)
            })?;
            Ok(())
        },
    );
}

fn select_compress_into(b: &mut Battery) {
    let dest_fault = prop_oneof![
        (0usize..2).prop_map(DestFault::HeadDim),
        any::<u32>().prop_map(DestFault::Count),
        (0usize..48).prop_map(DestFault::Streaming),
        (0usize..48, any::<u32>()).prop_map(|(i, y)| DestFault::Capacity(i, y)),
    ];
    // Half the cases break the prompt, options or budgets (the destination fits), half the
    // destination.
    let fault = prop_oneof![sel_fault().prop_map(Ok), dest_fault.prop_map(Err)];
    b.run("select::compress_into", 8_000, (sel_case(), fault, any::<u32>()), |p, (mut c, fault, x)| {
        let s = store(p);
        let (layout, d, expect) = match &fault {
            Ok(f) => {
                let (layout, d, _) = sel_dest(&mut c, None, x);
                let Some(expect) = apply_sel(&mut c, f, true) else { return Ok(()) };
                (layout, d, expect)
            }
            Err(f) => {
                let (layout, d, expect) = sel_dest(&mut c, Some(f), x);
                (layout, d, expect.expect("a destination fault"))
            }
        };
        let mut dest = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
        let bufs = c.bufs(&s);
        let mut ws = SelectWorkspace::new();
        p.call(expect, || compress_into(&mut dest, &c.prompt(&bufs), c.budgets(), &c.opts, &mut ws))?;
        check(dest.layout() == &layout, || "a refused compress_into changed the destination".into())
    });
    b.controls("select::compress_into", |p| {
        // Control: a valid compression into a layout with gaps and headroom launches and sets
        // each segment's len to min(budget, q).
        let s = store(p);
        let (q, d, w) = (40, 64, 8);
        let data =
            |n: usize| s.upload(&(0..n).map(|i| bf16::from_f32((i % 11) as f32 / 5.0)).collect::<Vec<_>>());
        let (k, v, queries) = (data(2 * q * d).unwrap(), data(2 * q * d).unwrap(), data(2 * w * d).unwrap());
        let prompt = Prompt::<Counting, bf16> {
            k: &k,
            v: &v,
            queries: &queries,
            batch: 2,
            kv_heads: 1,
            group_size: 1,
            q_len: q,
            head_dim: d,
            packing: Default::default(),
        };
        let layout =
            LayerLayout::new(2, 1, 70, vec![Segment::full(3, 20, 5), Segment::full(30, 40, 0)]).unwrap();
        let mut dest = LayerCache::<_, bf16>::new(&s, layout, d).unwrap();
        let opts = SelectOptions { window: w, pool_kernel: 3, ..SelectOptions::default() };
        let before = p.launches.get();
        let mut ws = SelectWorkspace::new();
        p.call(Expect::Ok, || compress_into(&mut dest, &prompt, Budgets::PerRow(&[20, 50]), &opts, &mut ws))?;
        check(p.launches.get() > before, || "a valid compress_into did not launch".into())?;
        let lens: Vec<u32> = dest.layout().segments().iter().map(|s| s.len).collect();
        check(lens == [20, 40], || format!("lens {lens:?}"))
    });
}

// ---------------------------------------------------------------------------------------------
// R-KV eviction (`redundancy`), emulator store counting launches.

/// A layer for R-KV: segment 0 is `Full` with more tokens than any budget drawn here, the others
/// `Full` (some past the budget) or `Streaming`.
fn rkv_layout() -> impl Strategy<Value = LayerLayout> {
    let slot = (any::<bool>(), 0u32..=12, 0u32..3, 1u32..4);
    (1usize..=2, prop::collection::vec(slot, 1..=6), 0u32..3).prop_map(|(batch, slots, headroom)| {
        let kv_heads = slots.len().div_ceil(batch);
        let mut lb = LayoutBuilder::new(batch, kv_heads).headroom(headroom);
        for i in 0..batch * kv_heads {
            let (streaming, len, sink, window) = slots[i % slots.len()];
            let (b, h) = (i / kv_heads, i % kv_heads);
            lb = if i == 0 {
                lb.full(b, h, 8 + len)
            } else if streaming {
                lb.streaming(b, h, sink, window)
            } else {
                lb.full(b, h, len)
            };
        }
        lb.build().unwrap()
    })
}

#[derive(Clone, Debug)]
enum RkvFault {
    /// A valid call that compacts nothing (no launch).
    None,
    AlphaZero,
    AlphaAboveMax(usize),
    BudgetAtMostAlpha(u32),
    BudgetAboveInt32(usize),
    KernelEven(usize),
    KernelAboveInt32(usize),
    Lambda(f64),
    GroupSize(usize),
    RingHeads(u32),
    RingAlpha(u32),
    RingHeadDim,
    MaskLen(u32),
    MaskStreaming(usize, u32),
    EmptyRing(bool),
}

fn rkv_evict(b: &mut Battery) {
    let fault = prop_oneof![
        Just(RkvFault::None),
        Just(RkvFault::AlphaZero),
        prop_oneof![MAX_ALPHA + 1..1000, Just(usize::MAX / 2)].prop_map(RkvFault::AlphaAboveMax),
        any::<u32>().prop_map(RkvFault::BudgetAtMostAlpha),
        prop_oneof![i32::MAX as usize + 1..usize::MAX, Just(usize::MAX)].prop_map(RkvFault::BudgetAboveInt32),
        prop_oneof![(0usize..50).prop_map(|k| 2 * k), Just(usize::MAX - 1)].prop_map(RkvFault::KernelEven),
        prop_oneof![(i32::MAX as usize / 2 + 1..usize::MAX / 2).prop_map(|k| 2 * k + 1), Just(usize::MAX)]
            .prop_map(RkvFault::KernelAboveInt32),
        prop_oneof![
            prop::sample::select(vec![
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                -f64::MIN_POSITIVE,
                1.0 + f64::EPSILON
            ]),
            -1e300f64..-1e-300,
            1.0000001f64..1e300,
        ]
        .prop_map(RkvFault::Lambda),
        prop_oneof![Just(0usize), MAX_RKV_GROUP + 1..200, Just(usize::MAX)].prop_map(RkvFault::GroupSize),
        any::<u32>().prop_map(RkvFault::RingHeads),
        any::<u32>().prop_map(RkvFault::RingAlpha),
        Just(RkvFault::RingHeadDim),
        any::<u32>().prop_map(RkvFault::MaskLen),
        (0usize..12, any::<u32>()).prop_map(|(i, x)| RkvFault::MaskStreaming(i, x)),
        any::<bool>().prop_map(RkvFault::EmptyRing),
    ];
    let opts = (1usize..=4, 1usize..=3, 0usize..4, 0usize..6, 0.0f64..=1.0, any::<bool>());
    b.run(
        "redundancy::evict",
        6_000,
        (rkv_layout(), 1usize..=4, opts, any::<u32>(), fault),
        |p, (layout, g, (alpha, extra, kernel, buffer, lambda, quirk), x, fault)| {
            let s = store(p);
            let d = 64;
            let n = layout.segments().len();
            let mut opts = RkvOptions {
                budget: alpha + extra,
                buffer,
                alpha,
                kernel: 2 * kernel + 1,
                lambda,
                fidelity_quirk: quirk,
            };
            let mut group = g;
            let (mut heads, mut ring_alpha, mut ring_d) = (n * g, alpha, d);
            let full: Vec<bool> = layout.segments().iter().map(|s| s.mode == SegmentMode::Full).collect();
            // Valid: a mask over Full segments none of which holds more than the budget, or
            // a threshold no segment reaches.
            let quiet: Vec<bool> = layout
                .segments()
                .iter()
                .map(|s| s.mode == SegmentMode::Full && s.len as usize <= opts.budget)
                .collect();
            let mut mask = Some(quiet);
            let expect = match fault {
                RkvFault::None => {
                    if x % 2 == 0 {
                        (mask, opts.buffer) = (None, 100);
                    }
                    Expect::Ok
                }
                RkvFault::AlphaZero => {
                    opts.alpha = 0;
                    invalid("alpha")
                }
                RkvFault::AlphaAboveMax(a) => {
                    (opts.alpha, opts.budget) = (a, a + 1);
                    invalid("alpha")
                }
                RkvFault::BudgetAtMostAlpha(y) => {
                    opts.budget = y as usize % (alpha + 1);
                    invalid("budget")
                }
                RkvFault::BudgetAboveInt32(v) => {
                    opts.budget = v;
                    invalid("budget")
                }
                RkvFault::KernelEven(k) => {
                    opts.kernel = k;
                    invalid("kernel")
                }
                RkvFault::KernelAboveInt32(k) => {
                    opts.kernel = k;
                    invalid("kernel")
                }
                RkvFault::Lambda(l) => {
                    opts.lambda = l;
                    invalid("lambda")
                }
                RkvFault::GroupSize(v) => {
                    group = v;
                    invalid("group_size")
                }
                RkvFault::RingHeads(y) => {
                    // Sized for another group or segment count.
                    heads = match y % 3 {
                        0 => n * g + 1,
                        1 if n * g > 1 => n * g - 1,
                        _ => n * (g % 4 + 1) + n * 4,
                    };
                    invalid("ring")
                }
                RkvFault::RingAlpha(y) => {
                    ring_alpha = 1 + (alpha + y as usize % (MAX_ALPHA - 1)) % MAX_ALPHA;
                    invalid("ring")
                }
                RkvFault::RingHeadDim => {
                    ring_d = SUPPORTED_HEAD_DIMS[1 + x as usize % 2];
                    invalid("ring")
                }
                RkvFault::MaskLen(y) => {
                    let len = [n + 1, n - 1, 0, n * 2, n + 1 + y as usize % 100][y as usize % 5];
                    mask = Some(vec![false; len]);
                    invalid("trigger")
                }
                RkvFault::MaskStreaming(i, y) => {
                    match pick(layout.segments(), i, |s| s.mode != SegmentMode::Full) {
                        Some(k) => {
                            // Also any Full segments (which would be compacted): the Streaming one
                            // is refused first.
                            let mut m: Vec<bool> =
                                full.iter().enumerate().map(|(j, &f)| f && (y >> j) & 1 == 1).collect();
                            m[k] = true;
                            mask = Some(m);
                            invalid(format!("trigger[{k}]"))
                        }
                        None => {
                            mask = Some(vec![true; n + 1]);
                            invalid("trigger")
                        }
                    }
                }
                RkvFault::EmptyRing(threshold) => {
                    // Segment 0 holds more than the budget; no query was pushed.
                    if threshold {
                        (mask, opts.buffer) = (None, layout.segments()[0].len as usize - opts.budget);
                    } else {
                        mask.as_mut().unwrap()[0] = true;
                    }
                    invalid("ring")
                }
            };
            let mut cache = LayerCache::<_, bf16>::new(&s, layout.clone(), d).unwrap();
            let ring = QueryRing::<_, bf16>::new(&s, heads, ring_alpha, ring_d).unwrap();
            let trigger = match &mask {
                Some(m) => RkvTrigger::Forced(m),
                None => RkvTrigger::Threshold,
            };
            let mut ws = RkvWorkspace::new();
            if let Some(done) = p.call(expect, || evict(&mut cache, &ring, group, &opts, trigger, &mut ws))? {
                check(done == vec![false; n], || {
                    format!("compacted {done:?} with no segment past the budget")
                })?;
            }
            check(cache.layout() == &layout, || {
                "an eviction that compacted nothing changed the layout".into()
            })
        },
    );
    b.controls("redundancy::evict", |p| {
        // Control: a segment past the budget, with queries pushed, is compacted (4 launches) to
        // the budget; the Streaming one is left alone.
        let s = store(p);
        let layout = LayoutBuilder::new(1, 2).full(0, 0, 24).streaming(0, 1, 2, 4).build().unwrap();
        let d = 64;
        let rows: Vec<bf16> =
            (0..layout.total_rows() * d).map(|i| bf16::from_f32((i % 17) as f32 / 9.0)).collect();
        let (k, v) = (s.upload(&rows).unwrap(), s.upload(&rows).unwrap());
        let mut cache = LayerCache::from_parts(&s, layout, d, k, v).unwrap();
        let mut ring = QueryRing::<_, bf16>::new(&s, 2 * 2, 4, d).unwrap();
        let q = s.upload(&rows[..4 * d]).unwrap();
        p.call(Expect::Ok, || ring.push(&q))?;
        let opts = RkvOptions { alpha: 4, ..RkvOptions::new(10) };
        let before = p.launches.get();
        let mut ws = RkvWorkspace::new();
        let done = p.call(Expect::Ok, || {
            evict(&mut cache, &ring, 2, &opts, RkvTrigger::Forced(&[true, false]), &mut ws)
        })?;
        check(done == Some(vec![true, false]), || format!("compacted {done:?}"))?;
        check(p.launches.get() == before + 4, || "a compaction did not launch 4 kernels".into())?;
        check(cache.layout().segments()[0].len == 10, || format!("{:?}", cache.layout()))
    });
}

#[derive(Clone, Debug)]
enum H2oFault {
    /// Valid: a budget no Full segment exceeds (no launch).
    None,
    BudgetZero,
    BudgetAboveInt32(usize),
    RecentAboveBudget(u32),
    Mass(u32),
}

fn h2o_evict_by_mass(b: &mut Battery) {
    let fault = prop_oneof![
        Just(H2oFault::None),
        Just(H2oFault::BudgetZero),
        prop_oneof![i32::MAX as usize + 1..usize::MAX, Just(usize::MAX)].prop_map(H2oFault::BudgetAboveInt32),
        any::<u32>().prop_map(H2oFault::RecentAboveBudget),
        any::<u32>().prop_map(H2oFault::Mass),
    ];
    b.run(
        "heavy_hitters::evict_by_mass",
        4_000,
        (rkv_layout(), 1usize..=12, 0usize..=12, fault),
        |p, (layout, budget, r, fault)| {
            let s = store(p);
            let rows = layout.total_rows();
            let mut opts = H2oOptions { budget, recent: r % (budget + 1) };
            let mut mass_len = rows;
            let expect = match fault {
                H2oFault::None => {
                    opts.budget = layout.segments().iter().map(|s| s.len as usize).max().unwrap_or(0).max(1);
                    opts.recent = opts.recent.min(opts.budget);
                    Expect::Ok
                }
                H2oFault::BudgetZero => {
                    opts.budget = 0;
                    invalid("budget")
                }
                H2oFault::BudgetAboveInt32(v) => {
                    opts.budget = v;
                    invalid("budget")
                }
                H2oFault::RecentAboveBudget(x) => {
                    opts.recent = budget + 1 + x as usize % 1000;
                    invalid("recent")
                }
                H2oFault::Mass(x) => {
                    mass_len = wrong_len(rows, 1, x);
                    invalid("mass")
                }
            };
            let mut cache = LayerCache::<_, bf16>::new(&s, layout.clone(), 64).unwrap();
            let mut mass = s.zeros::<f32>(mass_len).unwrap();
            let mut ws = H2oWorkspace::new();
            if let Some(done) = p.call(expect, || evict_by_mass(&mut cache, &mut mass, &opts, &mut ws))? {
                check(done == vec![false; layout.segments().len()], || format!("compacted {done:?}"))?;
            }
            check(cache.layout() == &layout, || {
                "an eviction that compacted nothing changed the layout".into()
            })
        },
    );
    b.controls("heavy_hitters::evict_by_mass", |p| {
        // Control: the Full segment past the budget is compacted in one launch; the Streaming
        // one is left alone.
        let s = store(p);
        let layout = LayoutBuilder::new(1, 2).full(0, 0, 24).streaming(0, 1, 2, 4).build().unwrap();
        let rows = layout.total_rows();
        let mut cache = LayerCache::<_, bf16>::new(&s, layout, 64).unwrap();
        let mut mass = s.upload(&(0..rows).map(|i| (i % 7) as f32).collect::<Vec<_>>()).unwrap();
        let mut ws = H2oWorkspace::new();
        let before = p.launches.get();
        let opts = H2oOptions { budget: 10, recent: 3 };
        let done = p.call(Expect::Ok, || evict_by_mass(&mut cache, &mut mass, &opts, &mut ws))?;
        check(done == Some(vec![true, false]), || format!("compacted {done:?}"))?;
        check(p.launches.get() == before + 1, || "a compaction did not launch once".into())?;
        check(cache.layout().segments()[0].len == 10, || format!("{:?}", cache.layout()))
    });
}

fn query_ring_new(b: &mut Battery) {
    let fault = prop_oneof![
        Just(None),
        bad_head_dim().prop_map(|d| Some(("head_dim", d))),
        prop_oneof![Just(0usize), i32::MAX as usize + 1..usize::MAX, Just(usize::MAX)]
            .prop_map(|h| Some(("heads", h))),
        prop_oneof![Just(0usize), MAX_ALPHA + 1..1000, Just(usize::MAX)].prop_map(|a| Some(("alpha", a))),
    ];
    let d = prop::sample::select(SUPPORTED_HEAD_DIMS.to_vec());
    b.run(
        "QueryRing::new",
        4_000,
        (1usize..=64, 1usize..=MAX_ALPHA, d, fault),
        |p, (heads, alpha, d, fault)| {
            let s = store(p);
            let (mut heads, mut alpha, mut d) = (heads, alpha, d);
            let expect = match fault {
                None => Expect::Ok,
                Some((field, v)) => {
                    match field {
                        "head_dim" => d = v,
                        "heads" => heads = v,
                        _ => alpha = v,
                    }
                    invalid(field)
                }
            };
            if let Some(r) = p.call(expect, || QueryRing::<_, bf16>::new(&s, heads, alpha, d))? {
                check(
                    r.heads() == heads
                        && r.alpha() == alpha
                        && r.count() == 0
                        && Counting::len(r.buf()) == heads * alpha * d,
                    || "wrong ring".into(),
                )?;
            }
            Ok(())
        },
    );
}

fn query_ring_push(b: &mut Battery) {
    let d = prop::sample::select(SUPPORTED_HEAD_DIMS.to_vec());
    b.run(
        "QueryRing::push",
        3_000,
        (1usize..=16, 1usize..=MAX_ALPHA, d, any::<u32>()),
        |p, (heads, alpha, d, x)| {
            let s = store(p);
            let mut ring = QueryRing::<_, bf16>::new(&s, heads, alpha, d).unwrap();
            let q = s.zeros::<bf16>(wrong_len(heads * d, heads, x)).unwrap();
            p.call(invalid("q"), || ring.push(&q))?;
            check(ring.count() == 0 && ring.next_slot() == 0, || "a refused push moved the ring".into())
        },
    );
    b.controls("QueryRing::push", |p| {
        // Control: valid pushes launch once each and wrap around the ring.
        let s = store(p);
        let mut ring = QueryRing::<_, bf16>::new(&s, 3, 2, 64).unwrap();
        let q = s.upload(&vec![bf16::ONE; 3 * 64]).unwrap();
        for i in 0..3 {
            let before = p.launches.get();
            p.call(Expect::Ok, || ring.push(&q))?;
            check(p.launches.get() == before + 1, || format!("push {i} did not launch once"))?;
        }
        check(ring.count() == 2 && ring.next_slot() == 1, || "wrong ring position".into())
    });
}

// ---------------------------------------------------------------------------------------------
// The C ABI (feature `capi`): the `extern "C"` functions called directly, with the faults only
// a C caller can make (NULL pointers, lengths that disagree, unknown enum codes, bytes that are
// not UTF-8) and, through the same generators as above, the faults the Rust API refuses. The
// expected outcome of a C call is the Rust call's on the same input where one exists.

/// The C ABI's entry points; nothing without the `capi` feature.
fn c_abi(b: &mut Battery) {
    #[cfg(feature = "capi")]
    for entry in c::ENTRY_POINTS {
        entry(b);
    }
    #[cfg(not(feature = "capi"))]
    let _ = b;
}

#[cfg(feature = "capi")]
mod c {
    use super::*;
    use headwise::capi::*;
    use std::ffi::{c_char, c_int};
    use std::ptr::{NonNull, null, null_mut};

    // Inside the inline `mod c`, paths are relative to tests/c/.
    #[path = "../invalid_inputs/emulator_side.rs"]
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
        pub(super) fn c_call(
            &self,
            expect: Expect,
            f: impl FnOnce() -> c_int,
        ) -> Result<bool, TestCaseError> {
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
                return Err(TestCaseError::fail(format!(
                    "HEADWISE_ERROR_PANIC ({msg}); expected {expect:?}"
                )));
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
            let mut mode: Vec<i32> =
                t.segs
                    .iter()
                    .map(|s| {
                        if s.mode == SegmentMode::Full { HEADWISE_MODE_FULL } else { HEADWISE_MODE_STREAMING }
                    })
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
                check(unsafe { headwise_layout_total_rows(out, &mut rows) } == HEADWISE_OK, || {
                    "getter".into()
                })?;
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
        b.run(
            "C headwise_budget_uniform",
            1_000,
            (pair, prop::bool::weighted(0.1)),
            |p, ((c, w), null_out)| {
                let expect = if null_out { invalid("out") } else { expect_of(budget::uniform(c, w)) };
                let mut out = 0u32;
                let out_ptr: *mut u32 = if null_out { null_mut() } else { &mut out };
                // SAFETY: out is NULL or a writable u32.
                if p.c_call(expect, || unsafe { headwise_budget_uniform(c, w, out_ptr) })? {
                    check(out == c, || format!("{out} != {c}"))?;
                }
                Ok(())
            },
        );
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
        let params = (
            imp,
            0u32..64,
            prop_oneof![4 => 1u32..2000, 1 => Just(u32::MAX)],
            float(1.0..4.0),
            float(0.25..4.0),
        );
        // 0..=2: consistent; 3: bad variant; 4: out_len off; 5: NULL importance; 6: NULL out.
        b.run(
            "C headwise_budget_headkv",
            3_000,
            (params, 0u8..7, prop_oneof![Just(-1), 2i32..50, Just(i32::MAX)], any::<bool>()),
            |p, ((imp, w, base, beta, temp), k, bad_variant, factory)| {
                let base = base.saturating_add(w);
                let n = imp.len();
                let good_variant =
                    if factory { HEADWISE_HEADKV_KVCACHE_FACTORY } else { HEADWISE_HEADKV_REPO };
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
                c_expect
                    .unwrap_or_else(|| expect_of(duo_attention_config(std::str::from_utf8(&bytes).unwrap())))
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
    const SCORES_JSON: &str = r#"{"0-0": [1], "0-1": [2], "0-2": [3], "0-3": [4], "1-0": [0.5], "1-1": [1], "1-2": [0], "1-3": [2]}"#;

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
        b.run(
            "C headwise_head_gates_select_full",
            2_000,
            (sparsity, 0u8..6, 1usize..20),
            |p, (s, k, off)| {
                let n = rust.layers() * rust.kv_heads();
                let mask_len =
                    if k == 3 { if off % 2 == 0 { n + off } else { n.saturating_sub(off) } } else { n };
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
                    let want: Vec<u8> = (0..n)
                        .map(|i| u8::from(full.is_full(i / rust.kv_heads(), i % rust.kv_heads())))
                        .collect();
                    check(mask == want, || format!("mask {mask:?} != {want:?}"))?;
                }
                Ok(())
            },
        );
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
            assert_eq!(
                headwise_layout_pack(2, 2, 4, null(), null(), null(), null(), &mut layout),
                HEADWISE_OK
            );
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
                let code = unsafe {
                    headwise_gpu_create(-1 - (x % (i32::MAX as usize)) as i32, null_mut(), &mut out)
                };
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
                    headwise_cache_create(
                        null(),
                        l,
                        (x % 3) as c_int,
                        y % 300,
                        null_mut(),
                        null_mut(),
                        &mut out,
                    )
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
                    headwise_cache_attention(
                        null_mut(),
                        null(),
                        x % 9,
                        null_mut(),
                        null_mut(),
                        0.125,
                        y as u32,
                    )
                };
                (invalid("cache"), code)
            }),
            ("cache_compress_into", |x, _, _, _, _| {
                let budgets = [7u32; 4];
                let code = unsafe {
                    headwise_cache_compress_into(null_mut(), null(), null(), budgets.as_ptr(), x % 5)
                };
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
                    headwise_cache_evict_by_mass(
                        null_mut(),
                        null_mut(),
                        x % 9,
                        (y % 20) as u32,
                        0,
                        null_mut(),
                        0,
                    )
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
                let code = unsafe {
                    headwise_cache_evict(null_mut(), null(), x % 9, null(), null(), 0, null_mut(), 0)
                };
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
                (
                    if out.is_null() || x % 3 != 2 {
                        invalid("scores")
                    } else {
                        invalid("out left non-NULL")
                    },
                    code,
                )
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
}
