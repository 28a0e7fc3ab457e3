//! Emulator memory-traffic counts (cuda/simt/traffic.h): decode attention reads each K/V byte
//! exactly once per query group, with full 32-byte sectors; the counter itself is checked on
//! patterns whose counts are known in closed form (exact output bytes, linear scaling, the
//! merge kernel's strided scalar reads, the q_s bank conflicts); H2O's mass kernel reads each
//! kept K row once and each mass entry once.
#![cfg(feature = "emulator")]

mod common;

use common::{AttnSeg, attn_layout, values};
use half::{bf16, f16};
use headwise::emu::LaunchTraffic;
use headwise::layout::LayerLayout;
use headwise::{AttentionOptions, AttentionWorkspace, EmuStore, KvElem, LayerCache, Store};

/// Runs decode attention with counting on; returns the launches' counts (K/V watched) and the
/// layout's kept tokens.
fn run<T: KvElem>(
    layout: LayerLayout,
    head_dim: usize,
    group: usize,
    lse: bool,
) -> (Vec<LaunchTraffic>, u64) {
    let store = EmuStore;
    let rows = layout.total_rows();
    let kept: u64 = layout.segments().iter().map(|s| u64::from(s.len)).sum();
    let heads = layout.segments().len() * group;
    let k = store.upload(&values::<T>(1, rows * head_dim, 1.0)).unwrap();
    let v = store.upload(&values::<T>(2, rows * head_dim, 1.0)).unwrap();
    store.traffic_unwatch_all();
    store.traffic_watch(&k);
    store.traffic_watch(&v);
    let cache = LayerCache::<EmuStore, T>::from_parts(&store, layout, head_dim, k, v).unwrap();
    let q = store.upload(&values::<T>(3, heads * head_dim, 1.0)).unwrap();
    let mut out = store.zeros::<T>(heads * head_dim).unwrap();
    let mut lse_buf = store.zeros::<f32>(heads).unwrap();
    let mut ws = AttentionWorkspace::new();
    store.traffic_enable(Some(true));
    let _ = store.take_traffic();
    cache
        .attention(&q, group, &mut out, lse.then_some(&mut lse_buf), &mut ws, &AttentionOptions::default())
        .unwrap();
    let t = store.take_traffic();
    store.traffic_enable(None);
    store.traffic_unwatch_all();
    (t, kept)
}

fn short_layout() -> LayerLayout {
    // Unsplit segments (all below the planner's chunk), one empty, one wrapped ring.
    let segs = [
        AttnSeg::Full { len: 37 },
        AttnSeg::Full { len: 0 },
        AttnSeg::Streaming { sink: 2, window: 20, fill: 22, ring_head: 7 },
        AttnSeg::Full { len: 64 },
    ];
    attn_layout(1, 4, &segs)
}

fn kv_once<T: KvElem>() {
    let layout = short_layout();
    let mut per_group = Vec::new();
    for group in [1, 4, 8] {
        let (t, kept) = run::<T>(layout.clone(), 128, group, false);
        assert!(t.iter().all(|r| r.kernel.starts_with("hw_attention_")), "{t:?}");
        let s = LaunchTraffic::sum(&t);
        let want = kept * 128 * 2 * 2;
        assert_eq!(s.watched_read_bytes, want, "G={group}: K/V bytes read");
        assert_eq!(s.watched_unique_bytes, want, "G={group}: some K/V byte read twice or never");
        let eff = s.watched_sector_efficiency();
        eprintln!(
            "{:?} G={group}: K/V {} B, sector eff {:.4}, total {:?}",
            T::DTYPE,
            s.watched_read_bytes,
            eff,
            s
        );
        assert!(eff >= 0.9, "G={group}: K/V sector efficiency {eff}");
        // Unsplit: the output is written once, nothing else (no LSE requested).
        let heads = layout.segments().len() as u64 * group as u64;
        assert_eq!(s.write_bytes, heads * 128 * 2, "G={group}: output bytes");
        // K/V plus the group's queries (G rows per segment) and nothing else.
        assert_eq!(s.read_bytes, want + heads * 128 * 2, "G={group}: bytes read");
        per_group.push(s.watched_read_bytes);
    }
    assert!(per_group.windows(2).all(|w| w[0] == w[1]), "K/V reads depend on G: {per_group:?}");
}

#[test]
fn attention_reads_kv_once_f16() {
    kv_once::<f16>();
}

#[test]
fn attention_reads_kv_once_bf16() {
    kv_once::<bf16>();
}

/// A split segment (flash-decoding partials and a merge launch): each K/V byte is still read
/// once, and the merge kernel's strided scalar f32 reads (4 bytes per lane, 32 bytes apart)
/// show as poor sector efficiency: a pattern the counter must not report as coalesced.
#[test]
fn split_segment_and_strided_merge() {
    let layout = attn_layout(1, 2, &[AttnSeg::Full { len: 700 }, AttnSeg::Full { len: 5 }]);
    let (t, kept) = run::<f16>(layout, 128, 4, true);
    assert_eq!(t.len(), 2, "attention + merge: {t:?}");
    let s = LaunchTraffic::sum(&t);
    assert_eq!(s.watched_read_bytes, kept * 128 * 4);
    assert_eq!(s.watched_unique_bytes, kept * 128 * 4);
    let merge = t.iter().find(|r| r.kernel.contains("merge")).unwrap();
    assert!(merge.read_bytes > 0 && merge.sector_efficiency() < 0.3, "{merge:?}");
    assert!(t[0].watched_sector_efficiency() >= 0.9, "{:?}", t[0]);
}

/// Counts scale with the input: twice the tokens, twice the K/V bytes and sectors.
#[test]
fn counts_scale_with_tokens() {
    let one = |len| {
        let (t, _) =
            run::<f16>(attn_layout(1, 2, &[AttnSeg::Full { len }, AttnSeg::Full { len }]), 64, 2, false);
        LaunchTraffic::sum(&t)
    };
    let (a, b) = (one(48), one(96));
    assert_eq!(b.watched_read_bytes, 2 * a.watched_read_bytes);
    assert_eq!(b.watched_sectors, 2 * a.watched_sectors);
    assert!(a.watched_read_bytes == 2 * 48 * 64 * 2 * 2);
}

/// Shared memory: attention's per-lane scalar q_s reads (lane slice c reads float 8c + j) put
/// TPR distinct words on 32 / 8 = 4 banks: degree TPR / 4 (2 at head_dim 64, 4 at 128), so the
/// conflict factor must exceed 1 and grow with head_dim; counting off records nothing.
#[test]
fn smem_conflicts_and_off_switch() {
    let store = EmuStore;
    let c = |d| {
        let (t, _) = run::<f16>(short_layout(), d, 1, false);
        let s = LaunchTraffic::sum(&t);
        assert!(s.smem_requests > 0 && s.smem_ideal_wavefronts >= s.smem_requests, "{s:?}");
        s.smem_conflict()
    };
    let (c64, c128) = (c(64), c(128));
    assert!(c64 > 1.0 && c128 > c64, "conflict factors {c64} {c128}");

    store.traffic_enable(Some(false));
    let _ = store.take_traffic();
    let layout = short_layout();
    let k = store.zeros::<f16>(layout.total_rows() * 64).unwrap();
    let v = store.zeros::<f16>(layout.total_rows() * 64).unwrap();
    let cache = LayerCache::<EmuStore, f16>::from_parts(&store, layout, 64, k, v).unwrap();
    let q = store.zeros::<f16>(4 * 64).unwrap();
    let mut out = store.zeros::<f16>(4 * 64).unwrap();
    cache
        .attention(&q, 1, &mut out, None, &mut AttentionWorkspace::new(), &AttentionOptions::default())
        .unwrap();
    assert!(store.take_traffic().is_empty(), "counting off must record nothing");
    store.traffic_enable(None);
}

/// The cost `cuda/heavy_hitters.cu` documents for H2O's mass: the extra kernel reads each kept
/// token's K row exactly once (V never), and reads and writes each kept token's mass entry once.
#[test]
fn h2o_mass_reads_k_once_and_each_mass_entry_once() {
    let store = EmuStore;
    for (layout, group) in [
        (short_layout(), 4usize),
        (attn_layout(1, 2, &[AttnSeg::Full { len: 700 }, AttnSeg::Full { len: 5 }]), 8),
    ] {
        let d = 128;
        let rows = layout.total_rows();
        let kept: u64 = layout.segments().iter().map(|s| u64::from(s.len)).sum();
        let heads = layout.segments().len() * group;
        let k = store.upload(&values::<bf16>(1, rows * d, 1.0)).unwrap();
        let v = store.upload(&values::<bf16>(2, rows * d, 1.0)).unwrap();
        store.traffic_unwatch_all();
        store.traffic_watch(&k);
        store.traffic_watch(&v);
        let cache = LayerCache::<EmuStore, bf16>::from_parts(&store, layout, d, k, v).unwrap();
        let q = store.upload(&values::<bf16>(3, heads * d, 1.0)).unwrap();
        let mut out = store.zeros::<bf16>(heads * d).unwrap();
        let mut mass = store.zeros::<f32>(rows).unwrap();
        let mut ws = AttentionWorkspace::new();
        store.traffic_enable(Some(true));
        let _ = store.take_traffic();
        let opts = AttentionOptions::default();
        cache.attention_with_mass(&q, group, &mut out, None, &mut ws, &opts, &mut mass).unwrap();
        let t = store.take_traffic();
        store.traffic_enable(None);
        store.traffic_unwatch_all();
        let m: Vec<&LaunchTraffic> = t.iter().filter(|r| r.kernel.starts_with("hw_h2o_mass_")).collect();
        assert_eq!(m.len(), 1, "{t:?}");
        assert_eq!(
            m[0].watched_read_bytes,
            kept * d as u64 * 2,
            "G={group}: K bytes read by the mass kernel"
        );
        assert_eq!(m[0].watched_unique_bytes, kept * d as u64 * 2, "G={group}: a K byte read twice or never");
        assert_eq!(m[0].write_bytes, kept * 4, "G={group}: one mass write per kept token");
        eprintln!("G={group}: mass kernel {:?}", m[0]);
    }
}

/// Chunk attention (q_len > 1): a block serves a tile of 16 query rows (ordered chunk position,
/// then group head) and reads the K/V rows its last row can see, once. With G * q_len <= 16 the
/// whole chunk is one tile: every K/V byte once, as in decode. With more rows each tile reads
/// up to its own causal limit: closed form below. Against q_len decode steps, which read the
/// whole K/V q_len times.
#[test]
fn chunk_reads_kv_once_per_tile() {
    let store = EmuStore;
    let d = 128;
    let lens = [300u32, 41];
    let count = |group: usize, q_len: usize| {
        let layout = attn_layout(1, 2, &[AttnSeg::Full { len: lens[0] }, AttnSeg::Full { len: lens[1] }]);
        let rows = layout.total_rows();
        let qrows = 2 * group * q_len;
        let k = store.upload(&values::<f16>(1, rows * d, 1.0)).unwrap();
        let v = store.upload(&values::<f16>(2, rows * d, 1.0)).unwrap();
        store.traffic_unwatch_all();
        store.traffic_watch(&k);
        store.traffic_watch(&v);
        let cache = LayerCache::<EmuStore, f16>::from_parts(&store, layout, d, k, v).unwrap();
        let q = store.upload(&values::<f16>(3, qrows * d, 1.0)).unwrap();
        let mut out = store.zeros::<f16>(qrows * d).unwrap();
        let mut ws = AttentionWorkspace::new();
        store.traffic_enable(Some(true));
        let _ = store.take_traffic();
        // Unsplit (one chunk of tokens per segment), so the closed forms hold without a merge.
        let opts = AttentionOptions { chunk_tokens: Some(4096), scale: None };
        cache.attention_chunk(&q, q_len, group, &mut out, None, &mut ws, &opts).unwrap();
        let t = store.take_traffic();
        store.traffic_enable(None);
        store.traffic_unwatch_all();
        assert!(t.iter().all(|r| r.kernel.starts_with("hw_attention_chunk_")), "{t:?}");
        LaunchTraffic::sum(&t)
    };
    let row_bytes = (d * 2 * 2) as u64; // a K row and a V row, f16
    // One tile (G 4 x q_len 4 = 16 rows): each K/V byte exactly once.
    let one = count(4, 4);
    let kept: u64 = lens.iter().map(|&l| u64::from(l)).sum();
    assert_eq!(one.watched_read_bytes, kept * row_bytes);
    assert_eq!(one.watched_unique_bytes, kept * row_bytes);
    assert!(one.watched_sector_efficiency() >= 0.99, "{one:?}");
    // G 8 x q_len 8 = 64 rows, 4 tiles of 2 chunk positions: tile t sees len - 8 + 2t + 2 rows.
    let four = count(8, 8);
    let want: u64 = lens.iter().map(|&l| (0..4u64).map(|t| u64::from(l) - 8 + 2 * t + 2).sum::<u64>()).sum();
    assert_eq!(four.watched_read_bytes, want * row_bytes);
    assert_eq!(four.watched_unique_bytes, kept * row_bytes);
    eprintln!(
        "chunk G4 q_len 4: K/V {} B ({:.2}x the kept bytes); G8 q_len 8: {} B ({:.2}x; 8 decode steps: 8.00x)",
        one.watched_read_bytes,
        one.watched_read_bytes as f64 / (kept * row_bytes) as f64,
        four.watched_read_bytes,
        four.watched_read_bytes as f64 / (kept * row_bytes) as f64
    );
}
