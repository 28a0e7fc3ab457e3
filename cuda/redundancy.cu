// R-KV decode-time redundancy eviction (SPEC section 4; the f64 reference is
// src/reference/rkv.rs, which defines every number computed here). Shapes: HwRkvParams in
// params.h. Per target segment (Full, len L > budget, n = L - alpha candidates):
//   importance   one block per target: the ring's last queries against the candidates on the
//                tensor cores, max over the group on raw logits, online softmax over the
//                candidates (pass 1), then the mean probability per candidate (pass 2).
//   norms        one thread per key: 1 / (||k|| + 1e-8).
//   similarity   grid (targets, 32-row tiles): S = k_i . k_j on the tensor cores (raw f16/bf16
//                keys, exact products, f32 sums) scaled by both inverse norms, so normalized
//                keys are never rounded to 16 bits; diagonal zero; each row's most recent
//                j with S > 0.5 forgiven; per-tile column sums. S never reaches global memory.
//   select       one block per target: column means, softmax over all L columns (R), max-pooled
//                importance (A), score lambda * A - (1 - lambda) * R, radix top-(budget - alpha)
//                of the candidates plus the alpha window tokens, then the in-place compaction
//                (compact.cuh, shared with the H2O eviction) and the new len.
//   query_push   the ring update of every decode step (one query per query head).
// All reductions run in a fixed order and the top-k uses integer atomics only: the same inputs
// keep the same tokens on every run.
#include "compact.cuh"
#include "compat.cuh"
#include "dtype.cuh"
#include "params.h"
#include "segment.cuh"
#include "tile.cuh"
#include "topk.cuh"
#include "vec.cuh"

namespace hw {

constexpr int kRkvWarps = 4;
constexpr int kRkvThreads = 32 * kRkvWarps;
constexpr int kMaxAlpha = 16;  // queries per head in the ring (src/redundancy.rs MAX_ALPHA)
constexpr float kSimilar = 0.5f;
constexpr float kNormEps = 1e-8f;

template <typename T, int D>
__device__ void rkv_importance_body(const HwRkvParams& p) {
    constexpr int TOK = KeyTile<D>::TOK;
    constexpr int kLanesPerQuery = kRkvThreads / kMaxAlpha;
    __shared__ __align__(32) T q_s[kSlabRows * D];
    __shared__ __align__(32) T k_s[TOK * D];
    __shared__ __align__(32) float logit_s[kSlabRows * TOK];
    __shared__ float red_s[kMaxAlpha * TOK];  // [query t][candidate]: max over the group
    __shared__ float m_s[kMaxAlpha];
    __shared__ float l_s[kMaxAlpha];

    const int tgt = blockIdx.x;
    const int32_t s = p.targets[tgt];
    const SegmentView seg = SegmentView::load(p.seg, s);
    const int32_t n = seg.len - p.alpha;
    const int G = p.group_size, nq = p.ring_count, R = G * nq;
    const bool one_slab = R <= kSlabRows;
    const int tid = threadIdx.x;
    const int t_own = tid / kLanesPerQuery, part = tid % kLanesPerQuery;
    float* a_out = p.importance + int64_t(tgt) * p.max_len;
    // Query row r = g * nq + t is ring slot t of query head s * G + g.
    auto ring_row = [&](int r) { return (int64_t(s) * G + r / nq) * p.alpha + r % nq; };
    auto key_row = [&](int32_t t0) { return [=](int r) { return seg.row(t0 + r); }; };

    float m = -INFINITY, l = 0.0f;  // softmax state of query t_own over the candidates
    for (int pass = 0; pass < 2; ++pass) {
        for (int32_t t0 = 0; t0 < n; t0 += TOK) {
            const int cnt = min(TOK, n - t0);
            __syncthreads();  // previous readers of the shared tiles are done
            stage_rows<D, TOK, kRkvThreads>(p.k_cache, cnt, key_row(t0), k_s);
            for (int i = tid; i < nq * TOK; i += kRkvThreads) red_s[i] = -INFINITY;
            for (int r0 = 0; r0 < R; r0 += kSlabRows) {
                if (r0 > 0) __syncthreads();
                if (!one_slab || (pass == 0 && t0 == 0))
                    stage_rows<D, kSlabRows, kRkvThreads>(p.ring, R - r0, [&](int r) { return ring_row(r0 + r); },
                                                        q_s);
                __syncthreads();
                slab_logits<T, D, kRkvWarps>(q_s, k_s, logit_s);
                __syncthreads();
                // Thread c owns column c of red_s: the group max needs no atomics.
                if (tid < cnt) {
                    const int rows = min(kSlabRows, R - r0);
                    for (int r = 0; r < rows; ++r) {
                        float* acc = &red_s[((r0 + r) % nq) * TOK + tid];
                        st_shared(acc, fmaxf(ld_shared(acc), ld_shared(&logit_s[r * TOK + tid]) * p.scale_log2));
                    }
                }
            }
            __syncthreads();
            if (pass == 0) {
                float tm = -INFINITY, tl = 0.0f;
                if (t_own < nq) {
                    const float* rr = red_s + t_own * TOK;
                    for (int c = part; c < cnt; c += kLanesPerQuery) tm = fmaxf(tm, ld_shared(rr + c));
                    for (int c = part; c < cnt; c += kLanesPerQuery) {
                        const float x = ld_shared(rr + c);
                        tl += x == -INFINITY ? 0.0f : exp2f(x - tm);
                    }
                }
#pragma unroll
                for (int off = 1; off < kLanesPerQuery; off <<= 1) {
                    const float m2 = __shfl_xor_sync(0xffffffffu, tm, off);
                    const float l2 = __shfl_xor_sync(0xffffffffu, tl, off);
                    merge_softmax(tm, tl, m2, l2);
                }
                merge_softmax(m, l, tm, tl);
            } else if (tid < cnt) {
                float a = 0.0f;
                for (int t = 0; t < nq; ++t) a += exp2f(ld_shared(&red_s[t * TOK + tid]) - m_s[t]) / l_s[t];
                st_global(&a_out[t0 + tid], a / float(nq));
            }
        }
        // Read by pass 2 after the barrier at the top of its first tile.
        if (pass == 0 && part == 0 && t_own < nq) {
            m_s[t_own] = m;
            l_s[t_own] = l;
        }
    }
}

template <typename T, int D>
__device__ void rkv_norms_body(const HwRkvParams& p) {
    const int tgt = blockIdx.x;
    const SegmentView seg = SegmentView::load(p.seg, p.targets[tgt]);
    const int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
    if (j >= seg.len) return;
    const uint4* row = row_vec(p.k_cache, seg.row(int32_t(j)), D);
    float ss = 0.0f;
    for (int v = 0; v < D / kElemsPerVec; ++v) {
        float x[8];
        unpack8<T>(ld_global(row + v), x);
#pragma unroll
        for (int e = 0; e < 8; ++e) ss += x[e] * x[e];
    }
    st_global(&p.inv_norm[int64_t(tgt) * p.max_len + j], 1.0f / (sqrtf(ss) + kNormEps));
}

template <typename T, int D>
__device__ void rkv_similarity_body(const HwRkvParams& p) {
    constexpr int TOK = KeyTile<D>::TOK;
    constexpr int kLanesPerRow = kRkvThreads / kSlabRows;
    __shared__ __align__(32) T q_s[kSlabRows * D];
    __shared__ __align__(32) T k_s[TOK * D];
    __shared__ __align__(32) float logit_s[kSlabRows * TOK];
    __shared__ float inv_r[kSlabRows];
    __shared__ float inv_c[TOK];
    __shared__ int32_t fix_j[kSlabRows];
    __shared__ float fix_v[kSlabRows];
    __shared__ float first_v[kSlabRows];

    const int tgt = blockIdx.x;
    const SegmentView seg = SegmentView::load(p.seg, p.targets[tgt]);
    const int32_t L = seg.len;
    const int32_t i0 = blockIdx.y * kSlabRows;
    if (i0 >= L) return;  // whole block, before any barrier
    const int rows = min(kSlabRows, L - i0);
    const int tid = threadIdx.x;
    const float* inv = p.inv_norm + int64_t(tgt) * p.max_len;
    float* col_out = p.col_partial + (int64_t(tgt) * gridDim.y + blockIdx.y) * p.max_len;
    stage_rows<D, kSlabRows, kRkvThreads>(p.k_cache, rows, [&](int r) { return seg.row(i0 + r); }, q_s);
    if (tid < kSlabRows) inv_r[tid] = tid < rows ? inv[i0 + tid] : 0.0f;

    const int row = tid / kLanesPerRow, part = tid % kLanesPerRow;
    int32_t best_j = -1;  // the most recent j with S[i][j] > 0.5 seen by this lane
    float best_v = 0.0f, s0 = 0.0f;
    for (int32_t t0 = 0; t0 < L; t0 += TOK) {
        const int cnt = min(TOK, L - t0);
        __syncthreads();
        stage_rows<D, TOK, kRkvThreads>(p.k_cache, cnt, [&](int r) { return seg.row(t0 + r); }, k_s);
        if (tid < TOK) inv_c[tid] = tid < cnt ? inv[t0 + tid] : 0.0f;
        __syncthreads();
        slab_logits<T, D, kRkvWarps>(q_s, k_s, logit_s);
        __syncthreads();
        // Column pass: S in place of the logits, and this tile's column sums in row order.
        if (tid < cnt) {
            const int32_t j = t0 + tid;
            float sum = 0.0f;
            for (int r = 0; r < rows; ++r) {
                const float sv = i0 + r == j ? 0.0f : ld_shared(&logit_s[r * TOK + tid]) * inv_r[r] * inv_c[tid];
                st_shared(&logit_s[r * TOK + tid], sv);
                sum += sv;
            }
            st_global(&col_out[j], sum);
        }
        __syncthreads();
        // Row pass: columns ascend, so the last similar column a lane sees is its most recent.
        if (row < rows) {
            const float* sr = logit_s + row * TOK;
            for (int c = part; c < cnt; c += kLanesPerRow) {
                if (sr[c] > kSimilar) {
                    best_j = t0 + c;
                    best_v = sr[c];
                }
            }
            if (t0 == 0) s0 = sr[0];
        }
    }
#pragma unroll
    for (int off = 1; off < kLanesPerRow; off <<= 1) {
        const int32_t oj = __shfl_xor_sync(0xffffffffu, best_j, off);
        const float ov = __shfl_xor_sync(0xffffffffu, best_v, off);
        if (oj > best_j) {
            best_j = oj;
            best_v = ov;
        }
    }
    if (part == 0 && row < rows) {
        fix_j[row] = best_j;
        fix_v[row] = best_v;
        first_v[row] = s0;
    }
    __syncthreads();  // also orders every lane's col_out writes before the fix-ups below
    if (tid == 0) {
        // Forgive each row's most recent similar token (or, in fidelity mode, column 0 of a row
        // without one), in row order so the result does not depend on the schedule.
        for (int r = 0; r < rows; ++r) {
            if (fix_j[r] >= 0) {
                col_out[fix_j[r]] -= fix_v[r];
            } else if (p.fidelity_quirk) {
                col_out[0] -= first_v[r];
            }
        }
    }
}

// Deterministic block-wide reduction over kTopThreads threads (butterfly, then warps in order).
template <class Op>
__device__ float block_reduce(float v, Op op) {
    __shared__ float warp_val[kTopWarps];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (threadIdx.x % 32 == 0) warp_val[threadIdx.x / 32] = v;
    __syncthreads();
    float r = warp_val[0];
    for (int w = 1; w < kTopWarps; ++w) r = op(r, warp_val[w]);
    __syncthreads();  // warp_val is rewritten by the next call
    return r;
}

template <int D>
__device__ void rkv_select_body(const HwRkvParams& p) {
    const int tgt = blockIdx.x;
    const int32_t s = p.targets[tgt];
    const SegmentView seg = SegmentView::load(p.seg, s);
    const int32_t L = seg.len, n = L - p.alpha;
    const int tid = threadIdx.x;
    const int64_t base = int64_t(tgt) * p.max_len;
    const int tiles_used = (L + kSlabRows - 1) / kSlabRows;
    const int tiles_all = (p.max_len + kSlabRows - 1) / kSlabRows;
    float* cm = p.col_mean + base;

    float mx = -INFINITY;
    for (int32_t j = tid; j < L; j += kTopThreads) {
        float sum = 0.0f;
        for (int t = 0; t < tiles_used; ++t) sum += ld_global(&p.col_partial[(int64_t(tgt) * tiles_all + t) * p.max_len + j]);
        st_global(&cm[j], sum / float(L));
        mx = fmaxf(mx, sum / float(L));
    }
    mx = block_reduce(mx, [](float a, float b) { return fmaxf(a, b); });
    float se = 0.0f;
    for (int32_t j = tid; j < L; j += kTopThreads) se += expf(ld_global(cm + j) - mx);
    se = block_reduce(se, [](float a, float b) { return a + b; });

    const float* imp = p.importance + base;
    const int32_t r = p.pool_kernel / 2;
    for (int32_t j = tid; j < n; j += kTopThreads) {
        float a = -INFINITY;
        for (int32_t i = max(0, j - r); i <= min(n - 1, j + r); ++i) a = fmaxf(a, ld_global(imp + i));
        const float red = expf(ld_global(cm + j) - mx) / se;
        st_global(&p.keys[base + j], order_key(p.lambda * a - (1.0f - p.lambda) * red));
    }
    __syncthreads();  // keys complete before the selection reads them

    int32_t* kept = p.kept + int64_t(tgt) * p.budget;
    const int32_t k = p.budget - p.alpha;  // >= 1 and < n: checked on the host
    write_selected(p.keys + base, n, radix_threshold(p.keys + base, n, k), kept);
    for (int32_t i = tid; i < p.alpha; i += kTopThreads) kept[k + i] = n + i;
    __syncthreads();

    compact_rows<D>(p.k_cache, p.v_cache, nullptr, seg, kept, p.budget);
    if (tid == 0) p.seg.len[s] = p.budget;
}

template <int D>
__device__ void query_push_body(const HwQueryPushParams& p) {
    constexpr int VPR = D / kElemsPerVec;
    const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= int64_t(p.heads) * VPR) return;
    const int64_t h = idx / VPR;
    const int c = int(idx % VPR);
    st_global(row_vec(p.ring, h * p.alpha + p.slot, D) + c, ld_global(row_vec(p.q, h, D) + c));
}

}  // namespace hw

#define HW_RKV_TILE_KERNELS(X)                                         \
    X(hw_rkv_importance_f16_d64, importance, __half, 64)               \
    X(hw_rkv_importance_f16_d128, importance, __half, 128)             \
    X(hw_rkv_importance_f16_d256, importance, __half, 256)             \
    X(hw_rkv_importance_bf16_d64, importance, __nv_bfloat16, 64)       \
    X(hw_rkv_importance_bf16_d128, importance, __nv_bfloat16, 128)     \
    X(hw_rkv_importance_bf16_d256, importance, __nv_bfloat16, 256)     \
    X(hw_rkv_norms_f16_d64, norms, __half, 64)                         \
    X(hw_rkv_norms_f16_d128, norms, __half, 128)                       \
    X(hw_rkv_norms_f16_d256, norms, __half, 256)                       \
    X(hw_rkv_norms_bf16_d64, norms, __nv_bfloat16, 64)                 \
    X(hw_rkv_norms_bf16_d128, norms, __nv_bfloat16, 128)               \
    X(hw_rkv_norms_bf16_d256, norms, __nv_bfloat16, 256)               \
    X(hw_rkv_similarity_f16_d64, similarity, __half, 64)               \
    X(hw_rkv_similarity_f16_d128, similarity, __half, 128)             \
    X(hw_rkv_similarity_f16_d256, similarity, __half, 256)             \
    X(hw_rkv_similarity_bf16_d64, similarity, __nv_bfloat16, 64)       \
    X(hw_rkv_similarity_bf16_d128, similarity, __nv_bfloat16, 128)     \
    X(hw_rkv_similarity_bf16_d256, similarity, __nv_bfloat16, 256)

// Selection and compaction only move 16-bit rows: one instantiation per head_dim.
#define HW_RKV_SELECT_KERNELS(X)      \
    X(hw_rkv_select_d64, 64)          \
    X(hw_rkv_select_d128, 128)        \
    X(hw_rkv_select_d256, 256)

#define HW_QUERY_PUSH_KERNELS(X)      \
    X(hw_query_push_d64, 64)          \
    X(hw_query_push_d128, 128)        \
    X(hw_query_push_d256, 256)

#define HW_RKV_TILE_ENTRY(name, kind, T, D) \
    HW_KERNEL_ENTRY_BOUNDED(name, HwRkvParams, hw::kRkvThreads, (hw::rkv_##kind##_body<T, D>(p)))
#define HW_RKV_SELECT_ENTRY(name, D) \
    HW_KERNEL_ENTRY_BOUNDED(name, HwRkvParams, hw::kTopThreads, (hw::rkv_select_body<D>(p)))
#define HW_QUERY_PUSH_ENTRY(name, D) \
    HW_KERNEL_ENTRY_BOUNDED(name, HwQueryPushParams, 256, (hw::query_push_body<D>(p)))
HW_RKV_TILE_KERNELS(HW_RKV_TILE_ENTRY)
HW_RKV_SELECT_KERNELS(HW_RKV_SELECT_ENTRY)
HW_QUERY_PUSH_KERNELS(HW_QUERY_PUSH_ENTRY)
