//! Append on the GPU: one decode step's K/V rows into every segment of a Llama-3-8B layer
//! (8 KV heads, head_dim 128, bf16), batch 1 to 64, with 32k-token segments. Prints the bytes
//! each launch must move and, beside criterion's time, the AdaKV-style alternative's bytes (a
//! full-cache copy per step) for scale. Without a GPU it says so and measures nothing.

mod support;

use criterion::{Criterion, criterion_group, criterion_main};
use half::bf16;
use headwise::{LayerCache, LayoutBuilder, Store};
use std::time::{Duration, Instant};

const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const CONTEXT: u32 = 32 * 1024;
/// Appends between untimed resets of the segment lengths.
const HEADROOM: u32 = 1024;

fn bench(c: &mut Criterion) {
    let gpu = support::gpu_or_not_run("append");
    if support::emu_traffic_wanted(gpu.is_some()) {
        emu_traffic();
    }
    let Some(store) = gpu else { return };
    let bw = support::copy_bandwidth(&store);
    eprintln!("device copy bandwidth: {:.0} GB/s (read + write)", bw / 1e9);
    let mut group = c.benchmark_group("append");
    for batch in support::sizes(&[1usize, 8, 64], &[1, 64]) {
        let mut b = LayoutBuilder::new(batch, KV_HEADS).headroom(HEADROOM);
        for s in 0..batch {
            for h in 0..KV_HEADS {
                b = b.full(s, h, CONTEXT);
            }
        }
        let layout = b.build().unwrap();
        let mut cache = Some(LayerCache::<_, bf16>::new(&store, layout.clone(), HEAD_DIM).unwrap());
        let new = store.zeros::<bf16>(batch * KV_HEADS * HEAD_DIM).unwrap();
        let moved = 2 * 2 * batch * KV_HEADS * HEAD_DIM * 2; // read + write of K and V rows
        let adakv = 2 * 2 * batch * KV_HEADS * CONTEXT as usize * HEAD_DIM * 2; // copy whole cache
        eprintln!(
            "append batch {batch}: {moved} B per launch (floor); AdaKV's per-step copy moves {:.1} MB",
            adakv as f64 / 1e6
        );
        let name = format!("batch{batch}_ctx32k");
        let mut samples = Vec::new();
        group.bench_function(&name, |bch| {
            bch.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let chunk = left.min(u64::from(HEADROOM));
                    // Untimed: put every segment back at CONTEXT tokens.
                    let (_, k, v) = cache.take().unwrap().into_parts();
                    let mut c = LayerCache::from_parts(&store, layout.clone(), HEAD_DIM, k, v).unwrap();
                    store.synchronize().unwrap();
                    let t = Instant::now();
                    for _ in 0..chunk {
                        c.append(&new, &new).unwrap();
                    }
                    store.synchronize().unwrap();
                    total += t.elapsed();
                    cache = Some(c);
                    left -= chunk;
                }
                samples.push(total.as_secs_f64() / iters as f64);
                total
            })
        });
        support::floor_line(
            "append",
            &name,
            support::median(&mut samples),
            moved as f64 / bw,
            "bytes/copy_bw",
            &format!("batch={batch} ctx={CONTEXT} kv_heads={KV_HEADS} head_dim={HEAD_DIM} bytes={moved}"),
        );
    }
    group.finish();
}

/// Emulator-mode memory traffic of one append at batch 8, 256-token segments, against the GPU
/// line's floor (K and V rows read once and written once).
fn emu_traffic() {
    let store = headwise::EmuStore;
    let batch = 8;
    let mut b = LayoutBuilder::new(batch, KV_HEADS).headroom(4);
    for s in 0..batch {
        for h in 0..KV_HEADS {
            b = b.full(s, h, 256);
        }
    }
    let mut cache = LayerCache::<_, bf16>::new(&store, b.build().unwrap(), HEAD_DIM).unwrap();
    let new = store.upload(&vec![bf16::from_f32(1.0); batch * KV_HEADS * HEAD_DIM]).unwrap();
    let floor = (2 * 2 * batch * KV_HEADS * HEAD_DIM * 2) as u64;
    let t = support::emu_traffic(|_| cache.append(&new, &new).unwrap());
    support::print_emu_traffic(
        "append",
        &format!("batch{batch}_ctx256_kv{KV_HEADS}_d{HEAD_DIM}_bf16"),
        floor,
        &t,
    );
}

criterion_group! {
    name = benches;
    config = support::config(1000, 3000, 100);
    targets = bench
}
criterion_main!(benches);
