// Emulator memory-traffic counts, off unless HEADWISE_EMU_TRAFFIC=1 (not "0"/empty) or
// hw_emu_traffic_enable(1) on the launching OS thread (EmuStore::traffic_enable in Rust).
//
// What is counted: only the accesses kernels make through the counted helpers in cuda/vec.cuh
// (hw::ld_global / hw::st_global for global memory, hw::ld_shared / hw::st_shared for shared
// memory), which compile to the plain load/store under nvcc. Every kernel's hot-loop accesses go
// through them (K/V rows, queries, outputs, partials, scores, keys, kept indices, staged tiles
// and the smem loops over them). Not counted: WMMA load/store_matrix_sync on shared memory,
// segment-table reads, per-row softmax stats (select_stats*), the radix histogram atomics. Each launch yields one record (kernel name and the sums below), kept per OS thread
// until hw_emu_traffic_take (at most 65536; the oldest half is dropped beyond that). A launch
// that fails records nothing.
//
// Warp-wide grouping (the modeling assumption): lanes do not run in lockstep here, so the k-th
// execution of a call site (file:line) by each lane of a warp (warp = linear thread id / 32)
// forms one warp-wide access (per-lane, per-site occurrence counters, reset per block). This is
// exact for converged warps; in divergent loops with different trip counts per lane, accesses
// are grouped by occurrence index, which can under- or over-merge.
//   global: requests = warp-wide accesses; sectors = distinct 32-byte aligned segments covered
//           by the active lanes' byte ranges; sector efficiency = bytes / (sectors * 32)
//           (bytes count every lane, so lanes reading one address can push it above 1).
//   shared: 32 banks of 4 bytes; a warp access takes as many wavefronts as the largest number
//           of distinct 4-byte words mapped to one bank (the same word read by several lanes
//           is a broadcast, not a conflict); ideal = max(1, ceil(distinct words / 32)), so
//           128-bit accesses (4 ideal wavefronts) are not charged as conflicts.
// Watches: reads falling in registered host ranges are also summed separately (bytes, distinct
// bytes, requests, sectors), e.g. to check that attention reads each K/V byte exactly once.
#pragma once

#include <cstdint>

namespace hw_simt {

extern bool traffic_on;  // fixed for the duration of one launch

void traffic_record(const void* addr, uint32_t bytes, bool write, bool shared, const char* file, int line);
void traffic_launch_begin(const char* kernel);
void traffic_launch_end(bool ok);

}  // namespace hw_simt

// One launch's counts (mirrored by emu::LaunchTraffic in Rust).
struct HwTrafficRecord {
    const char* kernel;  // static string
    uint64_t read_bytes, write_bytes, requests, sectors;
    uint64_t smem_bytes, smem_requests, smem_wavefronts, smem_ideal_wavefronts;
    uint64_t watched_read_bytes, watched_unique_bytes, watched_requests, watched_sectors;
};
