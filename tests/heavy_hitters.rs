//! H2O heavy hitters through the emulator against the reference (see common::h2o::h2o_scenario
//! for what is checked): mass accumulated by decode attention, the eviction by it.
#![cfg(feature = "emulator")]

mod common;

use common::h2o::{H2oCase, H2oSeg, h2o_scenario};
use half::{bf16, f16};
use headwise::heavy_hitters::H2oOptions;
use headwise::{EmuStore, KvElem};

fn mixed(group: usize, head_dim: usize, chunk_tokens: Option<u32>, seed: u64) -> H2oCase {
    H2oCase {
        batch: 2,
        kv_heads: 2,
        group,
        head_dim,
        segs: vec![
            H2oSeg::Full { len: 150 },
            H2oSeg::Streaming { sink: 2, window: 7, fill: 9, ring_head: 3 },
            H2oSeg::Full { len: 9 },
            H2oSeg::Full { len: 40 },
        ],
        steps: (3, 2),
        opts: H2oOptions { budget: 24, recent: 8 },
        chunk_tokens,
        with_lse: seed.is_multiple_of(2),
        seed,
    }
}

fn every_shape<T: KvElem>() {
    for d in [64, 128, 256] {
        for g in [1, 4, 8] {
            // Split forced on (16-token chunks) and off (one chunk, whatever the length).
            for chunk in [Some(16), Some(1 << 30)] {
                let out = h2o_scenario::<_, T>(&EmuStore, &mixed(g, d, chunk, (d * 10 + g) as u64));
                eprintln!("d {d} g {g} chunk {chunk:?}: max rel err {:.2e}", out.max_rel_err);
                assert!(out.kept[0][0].is_some() && out.kept[0][1].is_none() && out.kept[0][2].is_none());
            }
        }
    }
}

#[test]
fn every_head_dim_group_and_split_f16() {
    every_shape::<f16>();
}

#[test]
fn every_head_dim_group_and_split_bf16() {
    every_shape::<bf16>();
}
