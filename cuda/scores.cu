// Query-agnostic prompt scores that feed select::compress_into_scored (the host wrapper is
// src/scores.rs). Shapes and buffers: HwScoreParams in params.h.
//
// Kernels, in launch order:
//   ea_logits  grid (segments, ceil(longest / 4)), 128 threads, one warp per key: for each of the
//              group's query heads, mean . k / sqrt(d) + k^T cov k / (2 d) (lanes over d; k
//              staged in shared memory for the covariance's matrix-vector product), into the
//              logits scratch. K read once.
//   ea_finish  one block per segment, 256 threads: per query head the softmax over the q - sink
//              non-sink keys
//              (max, then sum, fixed-order block reductions), the group mean, (+ epsilon) times
//              ||v|| for the prefix tokens, +inf for the sinks.
// Deterministic: every sum runs in a fixed order.
#include "compat.cuh"
#include "dtype.cuh"
#include "params.h"
#include "prompt.cuh"
#include "vec.cuh"

namespace hw {

constexpr int kScoreWarps = 4;
constexpr int kScoreThreads = 32 * kScoreWarps;
constexpr int kFinishThreads = 256;

__device__ __forceinline__ float warp_sum(float x) {
    for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
}

template <typename T, int D>
__device__ void scores_ea_logits_body(const HwScoreParams& p) {
    constexpr int VPR = D / kElemsPerVec;
    __shared__ float k_s[kScoreWarps][D];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int32_t s = blockIdx.x;
    const PromptSeg seg = PromptSeg::load(p.prompt, s);
    const int64_t t = int64_t(blockIdx.y) * kScoreWarps + warp;
    // No block barrier below: a warp past the end leaves whole, the others only use their own
    // row of k_s (__syncwarp orders it).
    if (t >= seg.len) return;
    const uint4* k = row_vec(p.k, seg.key_row(p.prompt, int32_t(t)), D);
    const int32_t G = p.prompt.group_size;
    // The segment's G logit rows, back to back, len apart.
    const int64_t l0 = RowSpan::load(p.prompt, int64_t(s) * G, G).all;
    for (int i = lane; i < VPR; i += 32) {
        float x[8];
        unpack8<T>(ld_global(k + i), x);
#pragma unroll
        for (int j = 0; j < 8; ++j) st_shared(&k_s[warp][i * 8 + j], x[j]);
    }
    __syncwarp();
    const float inv_sqrt_d = rsqrtf(float(D));
    for (int g = 0; g < G; ++g) {
        const int64_t head = int64_t(s) * G + g;
        const float* mu = p.mean + head * D;
        float dot = 0.0f, quad = 0.0f;
        for (int i = lane; i < D; i += 32) {
            const float ki = ld_shared(&k_s[warp][i]);
            dot = fmaf(ld_global(mu + i), ki, dot);
            if (p.cov != nullptr) {
                // Row i of cov times k, in a fixed order.
                const float* row = p.cov + (head * D + i) * D;
                float y = 0.0f;
                // Bounded unroll: fully unrolled, d64 held the whole row in 126 registers.
#pragma unroll 8
                for (int j = 0; j < D; ++j) y = fmaf(ld_global(row + j), ld_shared(&k_s[warp][j]), y);
                quad = fmaf(ki, y, quad);
            }
        }
        dot = warp_sum(dot);
        quad = warp_sum(quad);
        if (lane == 0) st_global(p.logits + l0 + int64_t(g) * seg.len + t, dot * inv_sqrt_d + quad / (2.0f * float(D)));
    }
}

// Block-wide reduction in a fixed order: warp shuffles, then warp 0 over the warps' results.
template <bool kMax>
__device__ float block_reduce(float x, float* red) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int off = 16; off > 0; off /= 2) {
        const float o = __shfl_xor_sync(0xffffffffu, x, off);
        x = kMax ? fmaxf(x, o) : x + o;
    }
    if (lane == 0) st_shared(&red[warp], x);
    __syncthreads();
    float r = ld_shared(&red[0]);
    for (int w = 1; w < kFinishThreads / 32; ++w) r = kMax ? fmaxf(r, ld_shared(&red[w])) : r + ld_shared(&red[w]);
    __syncthreads();  // red is rewritten by the next call
    return r;
}

template <typename T, int D>
__device__ void scores_ea_finish_body(const HwScoreParams& p) {
    constexpr int VPR = D / kElemsPerVec;
    __shared__ float red[kFinishThreads / 32];
    __shared__ float stat[2 * 16];  // per query head (G <= 16): max, 1 / sum
    const int32_t s = blockIdx.x;
    const PromptSeg seg = PromptSeg::load(p.prompt, s);
    const int32_t G = p.prompt.group_size, q = seg.len, n = seg.prefix(p.prompt);
    const float* l0 = p.logits + RowSpan::load(p.prompt, int64_t(s) * G, G).all;
    float* out = p.scores + RowSpan::load(p.prompt, s, 1).prefix;
    for (int g = 0; g < G; ++g) {
        const float* l = l0 + int64_t(g) * q;
        float m = -INFINITY;
        // The sinks are left out of the softmax (kvpress drops them before scoring).
        for (int32_t t = p.sink + threadIdx.x; t < q; t += kFinishThreads) m = fmaxf(m, ld_global(l + t));
        m = block_reduce<true>(m, red);
        float sum = 0.0f;
        for (int32_t t = p.sink + threadIdx.x; t < q; t += kFinishThreads) sum += expf(ld_global(l + t) - m);
        sum = block_reduce<false>(sum, red);
        if (threadIdx.x == 0) {
            st_shared(&stat[2 * g], m);
            st_shared(&stat[2 * g + 1], 1.0f / sum);
        }
    }
    __syncthreads();
    for (int32_t t = threadIdx.x; t < n; t += kFinishThreads) {
        float a = 0.0f;
        for (int g = 0; g < G; ++g) {
            const float* l = l0 + int64_t(g) * q;
            a += expf(ld_global(l + t) - ld_shared(&stat[2 * g])) * ld_shared(&stat[2 * g + 1]);
        }
        a /= float(G);
        if (p.use_vnorm) {
            const uint4* v = row_vec(p.v, seg.key_row(p.prompt, t), D);
            float vv = 0.0f;
            // Two vectors in flight: fully unrolled, d128 took 64 registers; by 4, a stack frame.
#pragma unroll 2
            for (int i = 0; i < VPR; ++i) {
                float x[8];
                unpack8<T>(ld_global(v + i), x);
#pragma unroll
                for (int j = 0; j < 8; ++j) vv = fmaf(x[j], x[j], vv);
            }
            a = (a + p.epsilon) * sqrtf(vv);
        }
        st_global(out + t, t < p.sink ? INFINITY : a);
    }
}

}  // namespace hw

#define HW_SCORES_KERNELS(X)                                      \
    X(hw_scores_ea_logits_f16_d64, ea_logits, __half, 64)         \
    X(hw_scores_ea_logits_f16_d128, ea_logits, __half, 128)       \
    X(hw_scores_ea_logits_f16_d256, ea_logits, __half, 256)       \
    X(hw_scores_ea_logits_bf16_d64, ea_logits, __nv_bfloat16, 64) \
    X(hw_scores_ea_logits_bf16_d128, ea_logits, __nv_bfloat16, 128) \
    X(hw_scores_ea_logits_bf16_d256, ea_logits, __nv_bfloat16, 256) \
    X(hw_scores_ea_finish_f16_d64, ea_finish, __half, 64)         \
    X(hw_scores_ea_finish_f16_d128, ea_finish, __half, 128)       \
    X(hw_scores_ea_finish_f16_d256, ea_finish, __half, 256)       \
    X(hw_scores_ea_finish_bf16_d64, ea_finish, __nv_bfloat16, 64) \
    X(hw_scores_ea_finish_bf16_d128, ea_finish, __nv_bfloat16, 128) \
    X(hw_scores_ea_finish_bf16_d256, ea_finish, __nv_bfloat16, 256)

#define HW_SCORES_ENTRY(name, kind, T, D) \
    HW_KERNEL_ENTRY_BOUNDED(name, HwScoreParams, 256, (hw::scores_##kind##_body<T, D>(p)))
HW_SCORES_KERNELS(HW_SCORES_ENTRY)
