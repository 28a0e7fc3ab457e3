//! Shared by the GPU benches: the device's measured copy bandwidth (the floor every
//! memory-bound kernel is compared with), non-zero test data without a slow upload, the
//! criterion settings, the quick size knob and the one parseable result line.
//!
//! Settings: each bench's defaults live in its `criterion_group!` config, so criterion's own
//! flags (`--warm-up-time 0.5 --measurement-time 2 --sample-size 10`) override them.
//! `HEADWISE_BENCH_QUICK=1` cuts each bench to a few sizes (scripts/gpu_pass.py sets it).
//! Every case prints one line to stdout:
//! `FLOOR kernel=K shape=S measured_us=M floor_us=F ratio=M/F basis=B [key=value ...]`,
//! which the GPU pass runner and benches/peers/peers.py read (measured = median sample).
#![allow(dead_code)]

use criterion::Criterion;
use cudarc::driver::CudaSlice;
use headwise::{GpuStore, KvElem};
use std::time::{Duration, Instant};

/// True when `HEADWISE_BENCH_QUICK` is set to anything but `0`: a few sizes per bench.
pub fn quick() -> bool {
    std::env::var("HEADWISE_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `full`, or `quick` under [`quick`].
pub fn sizes<T: Clone>(full: &[T], quick_set: &[T]) -> Vec<T> {
    if quick() { quick_set.to_vec() } else { full.to_vec() }
}

/// A bench's default criterion settings (command-line flags override them).
pub fn config(warm_up_ms: u64, measurement_ms: u64, samples: usize) -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(warm_up_ms))
        .measurement_time(Duration::from_millis(measurement_ms))
        .sample_size(samples)
}

/// Median of the per-iteration times of criterion's samples (seconds); NaN when none.
pub fn median(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The parseable result line (see the module doc). `extra`: shape parameters as `key=value`.
pub fn floor_line(kernel: &str, shape: &str, measured_s: f64, floor_s: f64, basis: &str, extra: &str) {
    println!(
        "FLOOR kernel={kernel} shape={shape} measured_us={:.3} floor_us={:.3} ratio={:.3} basis={basis} {extra}",
        measured_s * 1e6,
        floor_s * 1e6,
        measured_s / floor_s,
    );
}

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

/// Whether to print the emulator's memory-traffic lines: always without a GPU, and with one
/// when `HEADWISE_EMU_TRAFFIC` is set (not "0").
pub fn emu_traffic_wanted(gpu: bool) -> bool {
    !gpu || std::env::var("HEADWISE_EMU_TRAFFIC").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Runs `f` on the emulator with traffic counting on; returns its launches' counts.
pub fn emu_traffic(f: impl FnOnce(&headwise::EmuStore)) -> Vec<headwise::emu::LaunchTraffic> {
    let store = headwise::EmuStore;
    store.traffic_enable(Some(true));
    let _ = store.take_traffic();
    f(&store);
    let t = store.take_traffic();
    store.traffic_enable(None);
    t
}

/// Prints the emulator-mode traffic of one operation: one `EMU-TRAFFIC` line for the sum over
/// its launches against the bench's byte floor, then one `EMU-TRAFFIC-KERNEL` line per kernel.
pub fn print_emu_traffic(bench: &str, shape: &str, floor_bytes: u64, t: &[headwise::emu::LaunchTraffic]) {
    use headwise::emu::LaunchTraffic;
    let mut kernels: Vec<String> = Vec::new();
    for r in t {
        if !kernels.contains(&r.kernel) {
            kernels.push(r.kernel.clone());
        }
    }
    let line = |label: &str, kernel: &str, s: &LaunchTraffic, floor: Option<u64>| {
        let bytes = s.read_bytes + s.write_bytes;
        let floor =
            floor.map_or("-".to_string(), |f| format!("{f} bytes/floor={:.3}", bytes as f64 / f as f64));
        eprintln!(
            "{label} (emulator, not GPU) bench={bench} kernel={kernel} shape={shape} bytes={bytes} \
             (read={} write={}) floor_bytes={floor} sector_eff={:.1}% smem_conflict={:.2}x \
             (wavefronts {} / ideal {})",
            s.read_bytes,
            s.write_bytes,
            100.0 * s.sector_efficiency(),
            s.smem_conflict(),
            s.smem_wavefronts,
            s.smem_ideal_wavefronts,
        );
    };
    line("EMU-TRAFFIC", &kernels.join("+"), &LaunchTraffic::sum(t), Some(floor_bytes));
    if kernels.len() > 1 {
        for k in &kernels {
            let mine: Vec<LaunchTraffic> = t.iter().filter(|r| &r.kernel == k).cloned().collect();
            line("EMU-TRAFFIC-KERNEL", k, &LaunchTraffic::sum(&mine), None);
        }
    }
}
