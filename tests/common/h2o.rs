//! H2O heavy hitters: accumulated attention mass over decode steps and the eviction by it,
//! through a store against the plain-Rust reference (`headwise::reference::h2o`).

use super::{raw, values};
use headwise::heavy_hitters::{H2oOptions, H2oWorkspace, evict_by_mass};
use headwise::layout::{LayerLayout, Segment};
use headwise::reference::{self, h2o};
use headwise::{AttentionOptions, AttentionWorkspace, KvElem, LayerCache, Store};

/// One segment of an H2O scenario: Full with `len` tokens (capacity len + room for every
/// decode step), or Streaming with a ring filling or full (then rotated by `ring_head`).
#[derive(Clone, Debug)]
pub enum H2oSeg {
    Full { len: u32 },
    Streaming { sink: u32, window: u32, fill: u32, ring_head: u32 },
}

/// One scenario (see [`h2o_scenario`]).
#[derive(Clone, Debug)]
pub struct H2oCase {
    pub batch: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
    pub segs: Vec<H2oSeg>,
    /// Decode steps before the first eviction and between it and the second.
    pub steps: (usize, usize),
    pub opts: H2oOptions,
    /// Forced attention chunk (`Some(small)`: split; `Some(u32::MAX / 2)`: never split).
    pub chunk_tokens: Option<u32>,
    pub with_lse: bool,
    pub seed: u64,
}

/// Mass entries agree with the f64 reference within this much relative to the entry (plus
/// MASS_ABS): f32 D-term dot products and exp2 against an f64 softmax, a few steps summed.
pub const MASS_REL: f64 = 2e-5;
pub const MASS_ABS: f64 = 1e-7;

pub fn h2o_layout(case: &H2oCase) -> LayerLayout {
    let room = (case.steps.0 + case.steps.1) as u32;
    let mut off = 0u32;
    let mut out = Vec::new();
    for (i, s) in case.segs.iter().enumerate() {
        off += (i % 2) as u32; // gaps between segments
        let seg = match *s {
            H2oSeg::Full { len } => Segment::full(off, len + room, len),
            H2oSeg::Streaming { sink, window, fill, ring_head } => {
                let mut g = Segment::streaming(off, sink, window);
                g.len = fill.min(g.capacity);
                g.ring_head = if g.len == g.capacity { ring_head % window } else { 0 };
                g
            }
        };
        off += seg.capacity;
        out.push(seg);
    }
    LayerLayout::new(case.batch, case.kv_heads, u64::from(off) + 1, out).unwrap()
}

/// What a scenario saw, for tests that check more.
pub struct H2oOutcome {
    /// Per eviction, per segment: the kept positions of the compacted ones.
    pub kept: Vec<Vec<Option<Vec<usize>>>>,
    /// The largest relative mass error seen.
    pub max_rel_err: f64,
}

/// Runs `case` through `store` and the reference, starting from the same random K/V/mass
/// (mass in [0, 0.01), with planted exact ties), and checks:
/// - every decode step: `attention_with_mass`'s output and LSE bit-identical to
///   `attention`'s on the same cache (the mass kernel changes nothing else), and, after the
///   steps, every mass entry (rows no token occupies included: untouched) within
///   MASS_REL/MASS_ABS of the reference's f64 accumulation;
/// - each eviction token-exact against the reference over the device's own mass: which
///   segments were compacted, the kept positions, K, V and mass buffers bit-identical to the
///   reference's (so every kept row equals its source row, the freed mass is zero and nothing
///   else moved), host layout equal, device table equal to it;
/// - then more decode steps on the compacted cache (new tokens land on freed rows and must
///   start from zero mass) and a second eviction.
pub fn h2o_scenario<S: Store, T: KvElem>(store: &S, case: &H2oCase) -> H2oOutcome {
    let d = case.head_dim;
    let g = case.group;
    let layout = h2o_layout(case);
    let rows = layout.total_rows();
    let n = layout.segments().len();
    let heads = n * g;
    let amp = 1.0 + (case.seed % 3) as f32;
    let mut k_ref: Vec<T> = values(case.seed ^ 11, rows * d, amp);
    let mut v_ref: Vec<T> = values(case.seed ^ 22, rows * d, 1.0);
    // Mass in [0, 0.01) (below what a step adds, so the steps' mass dominates), every fifth row
    // equal to the row before (exact ties at the cut).
    let mut m0: Vec<f32> =
        values::<T>(case.seed ^ 44, rows, 1.0).iter().map(|x| 0.01 * x.to_f32().abs()).collect();
    for r in (1..rows).step_by(5) {
        m0[r] = m0[r - 1];
    }
    let mut mass_ref: Vec<f64> = m0.iter().map(|&x| f64::from(x)).collect();
    let mut lay_ref = layout.clone();
    let mut cache = LayerCache::<S, T>::from_parts(
        store,
        layout.clone(),
        d,
        store.upload(&k_ref).unwrap(),
        store.upload(&v_ref).unwrap(),
    )
    .unwrap();
    let mut mass = store.upload(&m0).unwrap();
    let opts = AttentionOptions { chunk_tokens: case.chunk_tokens, scale: None };
    let scale = 1.0 / (d as f64).sqrt();
    let mut ws = AttentionWorkspace::new();
    let mut ws_plain = AttentionWorkspace::new();
    let mut h2o_ws = H2oWorkspace::new();
    let mut outcome = H2oOutcome { kept: Vec::new(), max_rel_err: 0.0 };
    let mut step_seed = case.seed.wrapping_mul(31);

    for (phase, &steps) in [case.steps.0, case.steps.1].iter().enumerate() {
        for step in 0..steps {
            step_seed = step_seed.wrapping_add(1);
            let k_new: Vec<T> = values(step_seed ^ 0x100, n * d, amp);
            let v_new: Vec<T> = values(step_seed ^ 0x200, n * d, 1.0);
            let q: Vec<T> = values(step_seed ^ 0x300, heads * d, amp);
            cache.append(&store.upload(&k_new).unwrap(), &store.upload(&v_new).unwrap()).unwrap();
            reference::append(&mut lay_ref, d, &mut k_ref, &mut v_ref, &k_new, &v_new).unwrap();
            let dq = store.upload(&q).unwrap();
            let mut out = store.zeros::<T>(heads * d).unwrap();
            let mut lse = store.upload(&vec![f32::NAN; heads]).unwrap();
            cache
                .attention_with_mass(
                    &dq,
                    g,
                    &mut out,
                    case.with_lse.then_some(&mut lse),
                    &mut ws,
                    &opts,
                    &mut mass,
                )
                .unwrap();
            let mut out_plain = store.zeros::<T>(heads * d).unwrap();
            let mut lse_plain = store.upload(&vec![f32::NAN; heads]).unwrap();
            cache
                .attention(
                    &dq,
                    g,
                    &mut out_plain,
                    case.with_lse.then_some(&mut lse_plain),
                    &mut ws_plain,
                    &opts,
                )
                .unwrap();
            assert_eq!(
                raw(&store.download(&out).unwrap()),
                raw(&store.download(&out_plain).unwrap()),
                "phase {phase} step {step}: output differs from plain attention"
            );
            let bits =
                |b: &S::Buf<f32>| store.download(b).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&lse), bits(&lse_plain), "phase {phase} step {step}: LSE differs");
            h2o::attention_mass(&lay_ref, d, &k_ref, &q, g, scale, &mut mass_ref);
        }
        assert_eq!(cache.layout(), &lay_ref, "phase {phase}: layouts differ");
        let got = store.download(&mass).unwrap();
        for (r, (&a, &b)) in got.iter().zip(&mass_ref).enumerate() {
            let err = (f64::from(a) - b).abs();
            outcome.max_rel_err = outcome.max_rel_err.max(err / b.abs().max(1e-30));
            assert!(
                err <= MASS_REL * b.abs() + MASS_ABS,
                "phase {phase}: mass of row {r}: device {a} vs reference {b} (case {case:?})"
            );
        }

        // Eviction, token-exact against the reference over the device's own mass.
        let (k0, v0) = (store.download(cache.k()).unwrap(), store.download(cache.v()).unwrap());
        let mut m_host = got.clone();
        let (mut k_host, mut v_host) = (k0.clone(), v0.clone());
        let before = lay_ref.clone();
        let want =
            h2o::h2o_evict(&mut lay_ref, d, &mut k_host, &mut v_host, &mut m_host, &case.opts).unwrap();
        let done = evict_by_mass(&mut cache, &mut mass, &case.opts, &mut h2o_ws).unwrap();
        assert_eq!(done, want.iter().map(Option::is_some).collect::<Vec<_>>(), "phase {phase}: compacted?");
        let kept_dev: Vec<(usize, Vec<u32>)> = h2o_ws.kept(store).unwrap();
        let kept_want: Vec<(usize, Vec<u32>)> = want
            .iter()
            .enumerate()
            .filter_map(|(s, k)| k.as_ref().map(|k| (s, k.iter().map(|&p| p as u32).collect())))
            .collect();
        assert_eq!(kept_dev, kept_want, "phase {phase}: kept positions");
        let (k1, v1) = (store.download(cache.k()).unwrap(), store.download(cache.v()).unwrap());
        for (s, kept) in &kept_dev {
            let seg = before.segments()[*s];
            for (i, &p) in kept.iter().enumerate() {
                let (to, from) = (seg.row(i as u32) as usize * d, seg.row(p) as usize * d);
                assert_eq!(
                    raw(&k1[to..to + d]),
                    raw(&k0[from..from + d]),
                    "segment {s}: K row {i} (token {p})"
                );
                assert_eq!(
                    raw(&v1[to..to + d]),
                    raw(&v0[from..from + d]),
                    "segment {s}: V row {i} (token {p})"
                );
            }
        }
        assert!(raw(&k1) == raw(&k_host), "phase {phase}: K differs from the reference eviction");
        assert!(raw(&v1) == raw(&v_host), "phase {phase}: V differs from the reference eviction");
        let m1 = store.download(&mass).unwrap();
        assert_eq!(
            m1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            m_host.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "phase {phase}: mass differs from the reference eviction"
        );
        assert_eq!(cache.layout(), &lay_ref, "phase {phase}: layout after eviction");
        assert_eq!(store.download(cache.device_table()).unwrap(), lay_ref.device_table(), "device table");
        // Carry on from the evicted state (identical on both sides).
        (k_ref, v_ref) = (k_host, v_host);
        mass_ref = m_host.iter().map(|&x| f64::from(x)).collect();
        outcome.kept.push(want);
    }
    outcome
}
