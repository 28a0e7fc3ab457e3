// Prefill compression of one layer (SPEC section 3): SnapKV-family scoring, per-segment top-k
// with a different budget per segment, AdaKV's on-device budget allocation, and the gather of
// the kept K/V rows into a compressed layout. Shapes and buffers: HwSelectParams in params.h.
//
// Kernels, in launch order (the host wrapper is src/select/launch.rs):
//   stats        grid (segments, splits), 128 threads. Window logits of the segment's G*W query
//                rows against one chunk of the prompt's keys, on the tensor cores (WMMA
//                m16n16k16, f32 accumulate), reduced to a per-row online-softmax state
//                (max, sum of exp2) per chunk. Reads K once.
//   stats_merge  one thread per (segment, query row): folds the chunks' states.
//   score        grid (segments, splits): recomputes the logits of the prefix keys (K read a
//                second time), turns them into probabilities with the merged states, means over
//                the window and reduces over the group (or keeps each query head), and writes
//                one f32 per token. No W x q probability matrix ever reaches global memory.
//   knorm        (Score::KeyNorm, instead of stats/score) one warp per (row, prefix token):
//                -||k|| in f32 (kvpress's KNorm), K read once, no queries.
//   pool         one thread per (row, token): max/avg pooling, then an order-preserving u32 key.
//                With given scores (select::compress_into_scored) the first kernel to run.
//   adakv        (AdaKV only) one block per sequence: the global top (rows * Bp) keys over the
//                sequence's rows, counts per row, floored and rounded to per-row budgets.
//   threshold    (Budgets::Threshold only) one block per row: counts the pooled keys at or above
//                the threshold; that count plus W is the row's budget.
//   topk         one block per row: radix select (8-bit digits, four histogram passes over the
//                keys in global memory, so rows of any length work) of the (budget - W) best
//                prefix tokens, ties to the lower position, written in position order with the
//                window positions after them.
//   gather       grid (destination segments, y): copies the kept K/V rows into the destination
//                segments (Full, len already set by the host).
// Every selection is deterministic: histograms use integer atomics only, and every float sum
// runs in a fixed order.
#include "compat.cuh"
#include "dtype.cuh"
#include "params.h"
#include "prompt.cuh"
#include "segment.cuh"
#include "tile.cuh"
#include "topk.cuh"
#include "vec.cuh"

namespace hw {

constexpr int kSelWarps = 4;
constexpr int kSelThreads = 32 * kSelWarps;
constexpr int kMaxGroup = 16;

// Stages rows r0 .. r0 + kSlabRows of the segment's window queries (zeros past the last row).
template <typename T, int D>
__device__ void load_query_slab(const HwSelectParams& p, const PromptSeg& g, int r0, T* q_s) {
    const int R = p.prompt.group_size * p.prompt.window;
    stage_rows<D, kSlabRows, kSelThreads>(
        p.queries, R - r0, [&](int r) { return g.query_row(p.prompt, r0 + r); }, q_s);
}

// Stages the keys t0 .. t_end of segment g (zeros past t_end; their logits are masked).
template <typename T, int D>
__device__ void load_key_tile(const HwSelectParams& p, const PromptSeg& g, int32_t t0, int32_t t_end, T* k_s) {
    stage_rows<D, KeyTile<D>::TOK, kSelThreads>(
        p.k, t_end - t0, [&](int r) { return g.key_row(p.prompt, t0 + r); }, k_s);
}

// Score rows per source segment: the group's query heads, or one.
__device__ __forceinline__ int32_t rows_per_segment(const HwSelectParams& p) {
    return p.per_query_head ? p.prompt.group_size : 1;
}

// Tokens [begin, end) of split `split` over `limit` tokens; false when the split is empty.
__device__ __forceinline__ bool split_range(const HwSelectParams& p, int32_t limit, int32_t& begin,
                                            int32_t& end) {
    const int64_t b = int64_t(blockIdx.y) * p.chunk_tokens;
    if (b >= limit) return false;
    begin = int32_t(b);
    end = int32_t(min(int64_t(limit), b + p.chunk_tokens));
    return true;
}

template <typename T, int D>
__device__ void select_stats_body(const HwSelectParams& p) {
    constexpr int TOK = KeyTile<D>::TOK;
    constexpr int kThreadsPerRow = kSelThreads / kSlabRows;
    __shared__ __align__(32) T q_s[kSlabRows * D];
    __shared__ __align__(32) T k_s[TOK * D];
    __shared__ __align__(32) float logit_s[kSlabRows * TOK];

    const int32_t s = blockIdx.x;
    const PromptSeg g = PromptSeg::load(p.prompt, s);
    int32_t begin, end;
    if (!split_range(p, g.len, begin, end)) return;  // whole block, before any barrier
    const int W = p.prompt.window, R = p.prompt.group_size * W;
    const int32_t n = g.len - W;
    const bool one_slab = R <= kSlabRows;
    float* st = p.stats + (int64_t(s) * p.splits + blockIdx.y) * R * 2;
    const int row = threadIdx.x / kThreadsPerRow, part = threadIdx.x % kThreadsPerRow;
    // Row rr's state is owned by thread (rr % kSlabRows) * kThreadsPerRow for the whole block:
    // it initializes, reads and updates it, so no barrier guards st.
    if (part == 0)
        for (int rr = row; rr < R; rr += kSlabRows) st[2 * rr] = -INFINITY, st[2 * rr + 1] = 0.0f;

    for (int32_t t0 = begin; t0 < end; t0 += TOK) {
        const int32_t t_end = min(end, t0 + TOK);
        __syncthreads();  // the previous tile's readers of k_s / q_s / logit_s are done
        load_key_tile<T, D>(p, g, t0, t_end, k_s);
        for (int r0 = 0; r0 < R; r0 += kSlabRows) {
            if (r0 > 0) __syncthreads();
            if (!one_slab || t0 == begin) load_query_slab<T, D>(p, g, r0, q_s);
            __syncthreads();
            slab_logits<T, D, kSelWarps>(q_s, k_s, logit_s);
            __syncthreads();
            const int rr = r0 + row;
            float m = -INFINITY, l = 0.0f;
            if (rr < R) {
                // Causal inside the window: query i (position n + i) sees keys t <= n + i.
                const int32_t lim = int32_t(min(int64_t(t_end), int64_t(n) + rr % W + 1));
                const float* lr = logit_s + row * TOK;
                for (int32_t c = part; t0 + c < lim; c += kThreadsPerRow) m = fmaxf(m, ld_shared(lr + c) * p.scale_log2);
                for (int32_t c = part; t0 + c < lim; c += kThreadsPerRow) {
                    const float x = ld_shared(lr + c) * p.scale_log2;
                    l += x == -INFINITY ? 0.0f : exp2f(x - m);
                }
            }
#pragma unroll
            for (int off = 1; off < kThreadsPerRow; off <<= 1) {
                const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
                const float l2 = __shfl_xor_sync(0xffffffffu, l, off);
                merge_softmax(m, l, m2, l2);
            }
            if (rr < R && part == 0) {
                float gm = st[2 * rr], gl = st[2 * rr + 1];
                merge_softmax(gm, gl, m, l);
                st[2 * rr] = gm;
                st[2 * rr + 1] = gl;
            }
        }
    }
}

// One thread per (segment, query row): folds the per-split states in split order.
__device__ void select_stats_merge_body(const HwSelectParams& p) {
    const int R = p.prompt.group_size * p.prompt.window;
    const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= int64_t(p.num_segments) * R) return;
    const int64_t s = idx / R, rr = idx % R;
    const int used = int((int64_t(PromptSeg::load(p.prompt, s).len) + p.chunk_tokens - 1) / p.chunk_tokens);
    float m = -INFINITY, l = 0.0f;
    for (int c = 0; c < used; ++c) {
        const float* st = p.stats + ((s * p.splits + c) * R + rr) * 2;
        merge_softmax(m, l, st[0], st[1]);
    }
    p.final_stats[idx * 2] = m;
    p.final_stats[idx * 2 + 1] = l;
}

template <typename T, int D>
__device__ void select_score_body(const HwSelectParams& p) {
    constexpr int TOK = KeyTile<D>::TOK;
    __shared__ __align__(32) T q_s[kSlabRows * D];
    __shared__ __align__(32) T k_s[TOK * D];
    __shared__ __align__(32) float logit_s[kSlabRows * TOK];
    __shared__ float acc_s[kMaxGroup * TOK];  // [g][token]: sum over the head's window queries
    __shared__ float m_s[kSlabRows];
    __shared__ float l_s[kSlabRows];

    const int32_t s = blockIdx.x;
    const PromptSeg seg = PromptSeg::load(p.prompt, s);
    const int W = p.prompt.window, G = p.prompt.group_size, R = G * W;
    const int32_t n = seg.prefix(p.prompt);
    int32_t begin, end;
    if (!split_range(p, n, begin, end)) return;  // only prefix tokens are scored
    // The segment's first score row; its G per-query-head rows follow each other, n apart.
    const int64_t out0 = RowSpan::load(p.prompt, int64_t(s) * rows_per_segment(p), rows_per_segment(p)).prefix;
    const bool one_slab = R <= kSlabRows;
    const int tid = threadIdx.x;
    const float* fs = p.final_stats + int64_t(s) * R * 2;

    for (int32_t t0 = begin; t0 < end; t0 += TOK) {
        const int32_t t_end = min(end, t0 + TOK);
        __syncthreads();
        load_key_tile<T, D>(p, seg, t0, t_end, k_s);
        for (int i = tid; i < G * TOK; i += kSelThreads) acc_s[i] = 0.0f;
        for (int r0 = 0; r0 < R; r0 += kSlabRows) {
            if (r0 > 0) __syncthreads();
            if (!one_slab || t0 == begin) {
                load_query_slab<T, D>(p, seg, r0, q_s);
                if (tid < kSlabRows) {
                    const bool live = r0 + tid < R;
                    m_s[tid] = live ? fs[2 * (r0 + tid)] : 0.0f;
                    l_s[tid] = live ? fs[2 * (r0 + tid) + 1] : 1.0f;
                }
            }
            __syncthreads();
            slab_logits<T, D, kSelWarps>(q_s, k_s, logit_s);
            __syncthreads();
            // Thread c owns token column c of acc_s, so the sums need no atomics and run in row
            // order: the same result on every run. Every window query sees every prefix key.
            if (tid < TOK && t0 + tid < t_end) {
                const int rows = min(kSlabRows, R - r0);
                for (int r = 0; r < rows; ++r) {
                    const float x = ld_shared(&logit_s[r * TOK + tid]) * p.scale_log2;
                    float* a = &acc_s[((r0 + r) / W) * TOK + tid];
                    st_shared(a, ld_shared(a) + exp2f(x - m_s[r]) / l_s[r]);
                }
            }
        }
        if (tid < TOK && t0 + tid < t_end) {
            const int32_t t = t0 + tid;
            if (p.per_query_head) {
                for (int g = 0; g < G; ++g)
                    st_global(&p.scores[out0 + int64_t(g) * n + t], ld_shared(&acc_s[g * TOK + tid]) / float(W));
            } else {
                float red = p.gqa_mode == HW_GQA_MAX ? -INFINITY : 0.0f;
                for (int g = 0; g < G; ++g) {
                    const float v = ld_shared(&acc_s[g * TOK + tid]) / float(W);
                    red = p.gqa_mode == HW_GQA_MAX ? fmaxf(red, v) : red + v;
                }
                st_global(&p.scores[out0 + t], p.gqa_mode == HW_GQA_MAX ? red : red / float(G));
            }
        }
    }
}

// Pooling along tokens, stride 1, padding k/2: max ignores the padding (and NaN, as fmaxf
// does); avg counts the zero padding, so it always divides by k. Block x = score row, blocks
// y stride over its tokens.
__device__ void select_pool_body(const HwSelectParams& p) {
    const RowSpan row = RowSpan::load(p.prompt, blockIdx.x, rows_per_segment(p));
    const int32_t n = row.n, r = p.pool_kernel / 2;
    const float* sc = p.scores + row.prefix;
    for (int64_t i = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.y) * blockDim.x) {
        const int32_t t = int32_t(i);
        const int32_t lo = max(0, t - r), hi = int32_t(min(int64_t(n) - 1, int64_t(t) + r));
        float v;
        if (p.pool_mode == HW_POOL_MAX) {
            v = -INFINITY;
            for (int32_t j = lo; j <= hi; ++j) v = fmaxf(v, ld_global(sc + j));
        } else {
            v = 0.0f;
            for (int32_t j = lo; j <= hi; ++j) v += ld_global(sc + j);
            v /= float(p.pool_kernel);
        }
        // Sinks rank first whatever their score (ties at +inf go to the lower position: theirs).
        st_global(&p.keys[row.prefix + t], order_key(t < p.sink ? INFINITY : v));
    }
}

// One block per score row: keep min(budget, q) positions, ascending.
__device__ void select_topk_body(const HwSelectParams& p) {
    const int64_t row = blockIdx.x;
    const RowSpan span = RowSpan::load(p.prompt, row, rows_per_segment(p));
    const int32_t q = span.len, W = p.prompt.window, n = span.n;
    const int32_t budget = p.budgets[row];
    int32_t* out = p.kept + span.all;
    if (budget >= q) {  // keep everything (uniform across the block: no barrier is skipped)
        for (int32_t t = threadIdx.x; t < q; t += kTopThreads) out[t] = t;
        return;
    }
    const int32_t k = budget - W;  // 0 <= k < n: the host and the adakv kernel guarantee W <= budget
    if (k > 0) {
        const uint32_t* keys = p.keys + span.prefix;
        write_selected(keys, n, radix_threshold(keys, n, k), out);
    }
    for (int32_t i = threadIdx.x; i < W; i += kTopThreads) out[k + i] = n + i;
}

// AdaKV (SPEC section 3), one block per sequence over its rows_per_sequence score rows: the
// global top (rows * Bp) pooled scores (ties to the lower row, then position), c_h of them in
// row h, budget_h = rint(c_h * (1 - alpha) + floor(alpha * Bp)) + W in f32 (rint rounds half to
// even, as torch.round), capped at the row's n prefix tokens.
__device__ void select_adakv_body(const HwSelectParams& p) {
    const int32_t H = p.rows_per_sequence, W = p.prompt.window;
    const int64_t first = int64_t(blockIdx.x) * H;
    // The sequence's rows are back to back, n apart.
    const RowSpan span = RowSpan::load(p.prompt, first, rows_per_segment(p));
    const int32_t n = span.n;
    const uint32_t* keys = p.keys + span.prefix;
    const int64_t N = int64_t(H) * n;
    const int64_t total = min(int64_t(H) * p.adakv_prefix_budget, N);
    Threshold th{0xffffffffu, 0};
    if (total > 0) th = radix_threshold(keys, N, total);
    int64_t eq_before = 0;
    for (int32_t h = 0; h < H; ++h) {
        int64_t gt = 0, eq = 0;
        if (total > 0) {
            for (int64_t base = 0; base < n; base += kTopThreads) {
                const int64_t t = base + threadIdx.x;
                const uint32_t key = t < n ? keys[int64_t(h) * n + t] : 0u;
                gt += __syncthreads_count(t < n && key > th.key);
                eq += __syncthreads_count(t < n && key == th.key);
            }
        }
        if (threadIdx.x == 0) {
            const int64_t taken = gt + max(int64_t(0), min(eq, th.take_eq - eq_before));
            // Separate roundings (no FMA contraction), as torch's multiply then add.
            float c = rintf(__fadd_rn(__fmul_rn(float(taken), p.adakv_keep), float(p.adakv_floor)));
            c = fminf(fmaxf(c, float(min(p.sink, n))), float(n));
            p.budgets[first + h] = int32_t(c) + W;
        }
        eq_before += eq;
    }
}

// Threshold keep, one block per score row: the row's budget is the window plus its prefix
// tokens whose pooled key is at least threshold_key (NaN never is, sinks always are); the topk
// kernel then keeps exactly those. The count is a block reduction of integers: deterministic.
__device__ void select_threshold_body(const HwSelectParams& p) {
    const RowSpan row = RowSpan::load(p.prompt, blockIdx.x, rows_per_segment(p));
    const uint32_t* keys = p.keys + row.prefix;
    int64_t count = 0;
    for (int64_t base = 0; base < row.n; base += kTopThreads) {
        const int64_t t = base + threadIdx.x;
        count += __syncthreads_count(t < row.n && ld_global(keys + t) >= p.threshold_key);
    }
    if (threadIdx.x == 0) p.budgets[blockIdx.x] = int32_t(count) + p.prompt.window;
}

// KNorm (kvpress's KnormPress): a prefix token's score is -||k||, the f32 norm of its key row
// in the score row's source segment (s, or s / G for per-query-head rows); no queries are read.
// One warp per token, lanes over 16-byte vectors, so a warp reads its row coalesced.
// Block x = score row, warps of the blocks y stride over its tokens.
template <typename T, int D>
__device__ void select_knorm_body(const HwSelectParams& p) {
    constexpr int VPR = D / kElemsPerVec;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const RowSpan row = RowSpan::load(p.prompt, blockIdx.x, rows_per_segment(p));
    const PromptSeg src = PromptSeg::load(p.prompt, row.seg);
    // The loop bound is the same for a warp's 32 lanes, so the shuffles see all of them.
    for (int64_t t = int64_t(blockIdx.y) * kSelWarps + warp; t < row.n; t += int64_t(gridDim.y) * kSelWarps) {
        const uint4* k = row_vec(p.k, src.key_row(p.prompt, int32_t(t)), D);
        float acc = 0.0f;
        for (int i = lane; i < VPR; i += 32) {
            float x[8];
            unpack8<T>(ld_global(k + i), x);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc = fmaf(x[j], x[j], acc);
        }
        for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (lane == 0) st_global(&p.scores[row.prefix + t], -sqrtf(acc));
    }
}

// Copies kept rows: destination segment s takes prompt rows from source segment s (or s / G
// for per-query-head rows) of the prompt in either form. One warp per row, 16-byte vectors.
template <int D>
__device__ void select_gather_body(const HwSelectParams& p) {
    constexpr int VPR = D / kElemsPerVec;
    const int32_t s = blockIdx.x;
    const RowSpan span = RowSpan::load(p.prompt, s, rows_per_segment(p));
    const PromptSeg src = PromptSeg::load(p.prompt, span.seg);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const SegmentView seg = SegmentView::load(p.seg, s);
    const int32_t* kept = p.kept + span.all;
    // Not unrolled: ptxas's unrolled copy of this loop kept a 16-byte stack frame at head_dim 64.
#pragma unroll 1
    for (int64_t r = int64_t(blockIdx.y) * kSelWarps + warp; r < seg.len; r += int64_t(gridDim.y) * kSelWarps) {
        const int64_t from = src.key_row(p.prompt, ld_global(kept + r));
        const int64_t to = seg.row(int32_t(r));
        for (int i = lane; i < 2 * VPR; i += 32) {
            if (i < VPR) {
                st_global(row_vec(p.k_cache, to, D) + i, ld_global(row_vec(p.k, from, D) + i));
            } else {
                st_global(row_vec(p.v_cache, to, D) + (i - VPR), ld_global(row_vec(p.v, from, D) + (i - VPR)));
            }
        }
    }
}

}  // namespace hw

#define HW_SELECT_TILE_KERNELS(X)                            \
    X(hw_select_stats_f16_d64, stats, __half, 64)            \
    X(hw_select_stats_f16_d128, stats, __half, 128)          \
    X(hw_select_stats_f16_d256, stats, __half, 256)          \
    X(hw_select_stats_bf16_d64, stats, __nv_bfloat16, 64)    \
    X(hw_select_stats_bf16_d128, stats, __nv_bfloat16, 128)  \
    X(hw_select_stats_bf16_d256, stats, __nv_bfloat16, 256)  \
    X(hw_select_score_f16_d64, score, __half, 64)            \
    X(hw_select_score_f16_d128, score, __half, 128)          \
    X(hw_select_score_f16_d256, score, __half, 256)          \
    X(hw_select_score_bf16_d64, score, __nv_bfloat16, 64)    \
    X(hw_select_score_bf16_d128, score, __nv_bfloat16, 128)  \
    X(hw_select_score_bf16_d256, score, __nv_bfloat16, 256)  \
    X(hw_select_knorm_f16_d64, knorm, __half, 64)            \
    X(hw_select_knorm_f16_d128, knorm, __half, 128)          \
    X(hw_select_knorm_f16_d256, knorm, __half, 256)          \
    X(hw_select_knorm_bf16_d64, knorm, __nv_bfloat16, 64)    \
    X(hw_select_knorm_bf16_d128, knorm, __nv_bfloat16, 128)  \
    X(hw_select_knorm_bf16_d256, knorm, __nv_bfloat16, 256)

// Both dtypes are 16-bit and gather only moves rows: one instantiation per head_dim.
#define HW_SELECT_GATHER_KERNELS(X)    \
    X(hw_select_gather_d64, 64)        \
    X(hw_select_gather_d128, 128)      \
    X(hw_select_gather_d256, 256)

#define HW_SELECT_PLAIN_KERNELS(X)                                   \
    X(hw_select_stats_merge, hw::select_stats_merge_body, 256)       \
    X(hw_select_pool, hw::select_pool_body, 256)                     \
    X(hw_select_topk, hw::select_topk_body, hw::kTopThreads)         \
    X(hw_select_adakv, hw::select_adakv_body, hw::kTopThreads)       \
    X(hw_select_threshold, hw::select_threshold_body, hw::kTopThreads)

#define HW_SELECT_TILE_ENTRY(name, kind, T, D) \
    HW_KERNEL_ENTRY_BOUNDED(name, HwSelectParams, hw::kSelThreads, (hw::select_##kind##_body<T, D>(p)))
#define HW_SELECT_GATHER_ENTRY(name, D) \
    HW_KERNEL_ENTRY_BOUNDED(name, HwSelectParams, hw::kSelThreads, (hw::select_gather_body<D>(p)))
#define HW_SELECT_PLAIN_ENTRY(name, body, threads) \
    HW_KERNEL_ENTRY_BOUNDED(name, HwSelectParams, threads, (body(p)))
HW_SELECT_TILE_KERNELS(HW_SELECT_TILE_ENTRY)
HW_SELECT_GATHER_KERNELS(HW_SELECT_GATHER_ENTRY)
HW_SELECT_PLAIN_KERNELS(HW_SELECT_PLAIN_ENTRY)
