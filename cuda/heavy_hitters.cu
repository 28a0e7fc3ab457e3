// H2O-style heavy hitters (issue 16): the attention mass each cached token accumulates over the
// decode steps, and an eviction driven by it. Shapes: HwH2oParams in params.h; the f64
// reference is src/reference/h2o.rs.
//   mass    after decode attention (and its merge, when split) has written the final LSE of
//           every query head: per token row, the probability each of the group's query heads
//           gave it, recomputed from q . k and the LSE, summed over the group (fixed order,
//           g ascending) and added to the row's entry by exactly one thread. Recomputing reads
//           K once more (len * head_dim * 2 bytes per segment) plus 8 bytes of mass per row
//           (read + write) and the group's queries and LSEs once per block: about half of what
//           the attention pass itself moves (K and V), with no change to the attention kernels
//           and no workspace. (Storing the f32 logits from the attention pass instead would move
//           2 * G * 4 bytes per row but add stores and registers to every attention kernel.)
//   evict   one block per target segment: order-preserving keys of the candidates' mass, radix
//           top-(budget - recent) (topk.cuh), the recent newest tokens always, then the in-place
//           compaction of K, V and mass (compact.cuh, shared with R-KV), the freed rows' mass
//           zeroed (a token appended there later starts from 0) and len = budget.
// Integer atomics only, fixed-order sums: the same inputs give the same mass and kept set on
// every run.
#include "compact.cuh"
#include "compat.cuh"
#include "dtype.cuh"
#include "params.h"
#include "segment.cuh"
#include "topk.cuh"
#include "vec.cuh"

namespace hw {

constexpr int kMassWarps = 4;
constexpr int kMassThreads = 32 * kMassWarps;
constexpr int kMassMaxGroup = 16;  // src/attention.rs MAX_GROUP
constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int D>
__device__ void h2o_mass_body(const HwH2oParams& p) {
    constexpr int TPR = D / kElemsPerVec;  // threads per row
    constexpr int RPW = 32 / TPR;          // rows per warp per step
    constexpr int ROWS_PER_STEP = RPW * kMassWarps;
    __shared__ float q_s[kMassMaxGroup * D];
    __shared__ float lse_s[kMassMaxGroup];

    const int32_t s = blockIdx.x;
    const int G = p.group_size;
    const SegmentView seg = SegmentView::load(p.seg, s);
    const int64_t begin = int64_t(blockIdx.y) * p.tokens_per_block;
    if (begin >= seg.len) return;  // the whole block leaves together, before any barrier
    const int64_t end = min(int64_t(seg.len), begin + p.tokens_per_block);

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int sub = lane / TPR;
    const int col = lane % TPR;

    stage_rows_f32<T, D>(p.q, int64_t(s) * G, G, q_s, tid, kMassThreads);
    if (tid < G) lse_s[tid] = ld_global(p.lse + int64_t(s) * G + tid) * kLog2e;
    __syncthreads();

    for (int64_t base = begin; base < end; base += ROWS_PER_STEP) {
        const int64_t t = base + warp * RPW + sub;
        const bool valid = t < end;
        int64_t row = 0;
        float k[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (valid) {
            row = seg.row(int32_t(t));
            unpack8<T>(ld_global(row_vec(p.k_cache, row, D) + col), k);
        }
        float sum = 0.0f;
        for (int g = 0; g < G; ++g) {  // uniform over the block
            float part = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; ++j) part += ld_shared(&q_s[g * D + col * 8 + j]) * k[j];
            // Sum the row's TPR slices; all 32 lanes take part (TPR-lane groups are aligned).
#pragma unroll
            for (int off = TPR / 2; off > 0; off /= 2) part += __shfl_xor_sync(0xffffffffu, part, off);
            sum += exp2f(part * p.scale_log2 - ld_shared(&lse_s[g]));
        }
        if (valid && col == 0) st_global(p.mass + row, ld_global(p.mass + row) + sum);
    }
}

template <int D>
__device__ void h2o_evict_body(const HwH2oParams& p) {
    const int tgt = blockIdx.x;
    const int32_t s = p.targets[tgt];
    const SegmentView seg = SegmentView::load(p.seg, s);
    const int32_t L = seg.len, n = L - p.recent;
    const int tid = threadIdx.x;
    uint32_t* keys = p.keys + int64_t(tgt) * p.max_len;
    for (int32_t j = tid; j < n; j += kTopThreads) st_global(&keys[j], order_key(ld_global(p.mass + seg.row(j))));
    __syncthreads();  // keys complete before the selection reads them

    int32_t* kept = p.kept + int64_t(tgt) * p.budget;
    const int32_t k = p.budget - p.recent;  // 0 <= k < n: checked on the host
    if (k > 0) write_selected(keys, n, radix_threshold(keys, n, k), kept);
    for (int32_t i = tid; i < p.recent; i += kTopThreads) kept[k + i] = n + i;
    __syncthreads();

    compact_rows<D>(p.k_cache, p.v_cache, p.mass, seg, kept, p.budget);
    // Rows budget .. L are free now: a later append must start from zero mass. (compact_rows
    // ends on a barrier, so no lane still reads them.)
    for (int32_t i = p.budget + tid; i < L; i += kTopThreads) st_global(p.mass + seg.row(i), 0.0f);
    if (tid == 0) p.seg.len[s] = p.budget;
}

}  // namespace hw

#define HW_H2O_MASS_KERNELS(X)                          \
    X(hw_h2o_mass_f16_d64, __half, 64)                  \
    X(hw_h2o_mass_f16_d128, __half, 128)                \
    X(hw_h2o_mass_f16_d256, __half, 256)                \
    X(hw_h2o_mass_bf16_d64, __nv_bfloat16, 64)          \
    X(hw_h2o_mass_bf16_d128, __nv_bfloat16, 128)        \
    X(hw_h2o_mass_bf16_d256, __nv_bfloat16, 256)

// The eviction only moves 16-bit rows: one instantiation per head_dim.
#define HW_H2O_EVICT_KERNELS(X)      \
    X(hw_h2o_evict_d64, 64)          \
    X(hw_h2o_evict_d128, 128)        \
    X(hw_h2o_evict_d256, 256)

#define HW_H2O_MASS_ENTRY(name, T, D) \
    HW_KERNEL_ENTRY_BOUNDED(name, HwH2oParams, hw::kMassThreads, (hw::h2o_mass_body<T, D>(p)))
#define HW_H2O_EVICT_ENTRY(name, D) \
    HW_KERNEL_ENTRY_BOUNDED(name, HwH2oParams, hw::kTopThreads, (hw::h2o_evict_body<D>(p)))
HW_H2O_MASS_KERNELS(HW_H2O_MASS_ENTRY)
HW_H2O_EVICT_KERNELS(HW_H2O_EVICT_ENTRY)
