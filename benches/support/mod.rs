//! Shared by the GPU benches: the device's measured copy bandwidth (the floor every
//! memory-bound kernel is compared with) and non-zero test data without a slow upload.
#![allow(dead_code)]

use cudarc::driver::CudaSlice;
use headwise::{GpuStore, KvElem};
use std::time::Instant;

/// Device 0, or None after saying why the bench measures nothing.
pub fn gpu_or_not_run(bench: &str) -> Option<GpuStore> {
    GpuStore::new(0).map_err(|e| eprintln!("{bench} bench: NOT RUN: {e}")).ok()
}

/// Device-to-device copy bandwidth in bytes/s (read + write counted), median of 10 copies of
/// 1 GiB.
pub fn copy_bandwidth(store: &GpuStore) -> f64 {
    let n = 1usize << 29; // u16 elements = 1 GiB
    let src = store.stream().alloc_zeros::<u16>(n).unwrap();
    let mut dst = store.stream().alloc_zeros::<u16>(n).unwrap();
    let mut times = Vec::new();
    for _ in 0..11 {
        store.synchronize().unwrap();
        let t = Instant::now();
        store.stream().memcpy_dtod(&src, &mut dst).unwrap();
        store.synchronize().unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    2.0 * (n * 2) as f64 / times[times.len() / 2]
}

/// `n` elements of a repeating pseudo-random pattern (never all zeros), filled on the device
/// by doubling copies of a 16 MiB upload.
pub fn filled<T: KvElem>(store: &GpuStore, n: usize) -> CudaSlice<T> {
    let block = (8usize << 20).min(n.max(1));
    let mut x = 0x9E3779B97F4A7C15u64;
    let pattern: Vec<T> = (0..block)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            T::from_f32(((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect();
    let mut out = store.stream().alloc_zeros::<T>(n).unwrap();
    let mut done = 0;
    while done < n {
        let len = block.min(n - done);
        let mut view = out.slice_mut(done..done + len);
        store.stream().memcpy_htod(&pattern[..len], &mut view).unwrap();
        done += len;
    }
    out
}
