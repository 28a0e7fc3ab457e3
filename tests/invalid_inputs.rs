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
//! Layout of the battery: this file holds the harness (`Battery`, `Probe`, `Expect`, the
//! launch-counting `Counting` store) and the entry-point list; the entries live by concern in
//! tests/invalid_inputs/: `layouts.rs` (and the valid-table generator others reuse), `policy.rs`
//! (gate files, head scores, budgets), `cache.rs` (LayerCache and stores), `chunk.rs`
//! (append_tokens, attention_chunk, rollback), `select.rs` (prefill compression and scores),
//! `evict.rs` (R-KV, H2O, the query ring) and `c.rs` (the C ABI, with `emulator_side.rs`).
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

#[path = "invalid_inputs/cache.rs"]
mod cache;
#[path = "invalid_inputs/chunk.rs"]
mod chunk;
#[path = "invalid_inputs/evict.rs"]
mod evict;
#[path = "invalid_inputs/layouts.rs"]
mod layouts;
#[path = "invalid_inputs/policy.rs"]
mod policy;
#[path = "invalid_inputs/select.rs"]
mod select;

use cache::*;
use evict::*;
use layouts::*;
use policy::*;
use select::*;

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
#[path = "invalid_inputs/c.rs"]
mod c;
