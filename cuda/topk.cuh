// Block-wide top-k by radix select over keys in global memory, shared by select.cu (prefill)
// and redundancy.cu (R-KV). Scores become order-preserving u32 keys; the k-th largest key is
// found digit by digit; the selected indices are written in ascending order, ties to the lower
// index. Only integer atomics and fixed-order scans: deterministic.
#pragma once
#include "compat.cuh"
#include "vec.cuh"

namespace hw {

constexpr int kTopThreads = 256;  // every block that calls into this file
constexpr int kTopWarps = kTopThreads / 32;

// Larger score -> larger key; NaN -> 0, below every number (-inf included).
__device__ __forceinline__ uint32_t order_key(float x) {
    if (x != x) return 0u;
    if (x == 0.0f) x = 0.0f;  // -0 and +0 are the same score (a tie, not an order)
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Block-wide exclusive prefix sum over kTopThreads threads; `total` gets the block's sum.
__device__ inline uint32_t block_exclusive_scan(uint32_t v, uint32_t& total) {
    __shared__ uint32_t warp_sum[kTopWarps];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint32_t x = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const uint32_t y = __shfl_up_sync(0xffffffffu, x, off);
        if (lane >= off) x += y;
    }
    if (lane == 31) warp_sum[warp] = x;
    __syncthreads();
    uint32_t before = 0, tot = 0;
    for (int w = 0; w < kTopWarps; ++w) {
        const uint32_t u = warp_sum[w];
        if (w < warp) before += u;
        tot += u;
    }
    __syncthreads();  // warp_sum is rewritten by the next call
    total = tot;
    return before + x - v;
}

struct Threshold {
    uint32_t key;     // the k-th largest key
    int64_t take_eq;  // how many keys equal to `key` are selected (the lowest indices)
};

// The k-th largest of keys[0 .. N) (1 <= k <= N), block-wide: MSB-first radix select with
// 8-bit digits. Each pass filters the keys that match the digits chosen so far and builds the
// next digit's histogram in the same sweep; the keys stay in global memory (L2), so N is not
// bounded by shared memory. Exactly k - take_eq keys are greater than the threshold.
__device__ inline Threshold radix_threshold(const uint32_t* keys, int64_t N, int64_t k) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t chosen_digit;
    __shared__ int64_t chosen_rem;
    uint32_t prefix = 0, mask = 0;
    int64_t rem = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += kTopThreads) hist[i] = 0;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < N; i += kTopThreads) {
            const uint32_t key = ld_global(keys + i);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            // Walk down from the top digit until the bucket holding the rem-th largest key.
            int64_t r = rem;
            int d = 255;
            for (; d > 0; --d) {
                if (int64_t(hist[d]) >= r) break;
                r -= hist[d];
            }
            chosen_digit = uint32_t(d);
            chosen_rem = r;
        }
        __syncthreads();
        prefix |= chosen_digit << shift;
        mask |= 255u << shift;
        rem = chosen_rem;
        // No barrier needed here: chosen_* are rewritten only after two more barriers.
    }
    return Threshold{prefix, rem};
}

// Writes the selected indices of keys[0 .. N) to out in ascending order: every key above the
// threshold and the first take_eq keys equal to it. One packed scan per tile: the high half
// counts keys above, the low half keys equal (a tile has at most 256 of each).
__device__ inline void write_selected(const uint32_t* keys, int64_t N, Threshold th, int32_t* out) {
    int64_t gt_carry = 0, eq_carry = 0;
    for (int64_t base = 0; base < N; base += kTopThreads) {
        const int64_t t = base + threadIdx.x;
        const uint32_t key = t < N ? ld_global(keys + t) : 0u;
        const bool gt = t < N && key > th.key, eq = t < N && key == th.key;
        uint32_t total;
        const uint32_t ex = block_exclusive_scan((uint32_t(gt) << 16) | uint32_t(eq), total);
        const int64_t g_before = gt_carry + (ex >> 16), e_before = eq_carry + (ex & 0xffffu);
        if (gt || (eq && e_before < th.take_eq)) out[g_before + min(e_before, th.take_eq)] = int32_t(t);
        gt_carry += total >> 16;
        eq_carry += total & 0xffffu;
    }
}

}  // namespace hw
