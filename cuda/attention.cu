// Decode attention over a layer's ragged segments, Full and Streaming mixed in one launch
// (SPEC section 5).
//
// Grid (num_segments, max_splits), 128 threads. A block serves the G query heads of one KV head
// over one chunk of that segment's tokens, so each K/V row is read once for the whole group.
// Inside a block a row is split over D/8 threads (16-byte loads); a warp covers 32/(D/8) rows per
// step and the four warps take consecutive rows. Every thread keeps a base-2 online-softmax state
// per query head for its 8-element slice; states merge across the rows of a warp with shuffles,
// then across warps through shared memory. Groups above 4 heads stage rows in shared memory and
// split the heads over the warps instead (attention_tiled_body), so per-thread state stays small.
// A segment that fits one chunk writes its output here;
// a longer one writes a normalized partial output and LSE per chunk, and the merge kernel
// combines them (flash-decoding). Rows are addressed only through SegmentView, so Streaming
// rings are read in place; attention does not care about their order.
#include "compat.cuh"
#include "dtype.cuh"
#include "params.h"
#include "segment.cuh"
#include "vec.cuh"

namespace hw {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = 32 * kAttnWarps;
constexpr float kLn2 = 0.693147180559945309f;

// Folds state (m2, d2, acc2) into (m, d, acc). Base-2 logits; an empty state has m = -inf.
__device__ __forceinline__ void merge_state(float& m, float& d, float (&acc)[8], float m2, float d2,
                                            const float (&acc2)[8]) {
    const float mn = fmaxf(m, m2);
    if (mn == -INFINITY) {
        // No finite logit on either side (exp2(-inf - -inf) would be NaN). d is 0, or NaN when
        // a NaN logit was seen: add so that NaN survives.
        d += d2;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] += acc2[j];
        return;
    }
    const float c1 = exp2f(m - mn);
    const float c2 = exp2f(m2 - mn);
    d = d * c1 + d2 * c2;
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = acc[j] * c1 + acc2[j] * c2;
    m = mn;
}

__device__ __forceinline__ int num_splits(int32_t len, int32_t chunk) {
    return len == 0 ? 1 : int((int64_t(len) + chunk - 1) / chunk);  // int64: len + chunk overflows
}

// 1/d, except that an empty state (d == 0) gives 0 rather than inf; NaN passes through so a
// NaN in a head's inputs shows in that head's output.
__device__ __forceinline__ float safe_inv(float d) { return d == 0.0f ? 0.0f : 1.0f / d; }

// Adds one row (base-2 logit x, value slice v) to a head's state (m, d, acc).
__device__ __forceinline__ void add_row(float& m, float& d, float (&acc)[8], float x, const float (&v)[8]) {
    const float mn = fmaxf(m, x);
    if (isnan(x)) {
        // fmaxf drops NaN; poison the sums instead so the head's output and LSE show it.
        d = x;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = x;
    } else if (mn != -INFINITY) {  // a -inf logit on an empty state adds nothing
        const float c = exp2f(m - mn);
        const float e = exp2f(x - mn);
        d = d * c + e;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = acc[j] * c + e * v[j];
        m = mn;
    }
}

// Writes query head qh's slice `col` of a finished state (M, Dn, A): the output (and LSE) when
// the segment is one chunk, else this chunk's normalized partial output and LSE.
template <typename T, int D>
__device__ __forceinline__ void write_head(const HwAttentionParams& p, int64_t qh, int split, int n_splits,
                                           int col, float M, float Dn, const float (&A)[8]) {
    const float inv = safe_inv(Dn);
    float o[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = A[j] * inv;
    // Dn is 0 only for an empty state; NaN (a NaN logit) must reach the LSE.
    const float lse2 = Dn == 0.0f ? -INFINITY : M + log2f(Dn);
    if (n_splits == 1) {
        st_global(row_vec(p.out, qh, D) + col, pack8<T>(o));
        if (p.lse != nullptr && col == 0) st_global(&p.lse[qh], lse2 * kLn2);
    } else {
        float* po = p.partial_out + (qh * p.max_splits + split) * D + col * 8;
#pragma unroll
        for (int j = 0; j < 8; ++j) st_global(&po[j], o[j]);
        if (col == 0) st_global(&p.partial_lse[qh * p.max_splits + split], lse2);
    }
}

template <typename T, int D, int GMAX>
__device__ void attention_rows_body(const HwAttentionParams& p) {
    constexpr int TPR = D / kElemsPerVec;  // threads per row
    constexpr int RPW = 32 / TPR;          // rows per warp per step
    constexpr int ROWS_PER_STEP = RPW * kAttnWarps;
    __shared__ float q_s[GMAX * D];
    __shared__ float warp_m[kAttnWarps];
    __shared__ float warp_d[kAttnWarps];
    __shared__ float warp_acc[kAttnWarps * D];

    const int32_t s = blockIdx.x;
    const int split = blockIdx.y;
    const int G = p.group_size;
    const SegmentView seg = SegmentView::load(p.seg, s);
    const int n_splits = num_splits(seg.len, p.chunk_tokens);
    if (split >= n_splits) return;  // the whole block leaves together, before any barrier
    // split * chunk < len for every launched split; the end needs int64 near the int32 limit.
    const int32_t begin = split * p.chunk_tokens;
    const int32_t end = int32_t(min(int64_t(seg.len), int64_t(begin) + p.chunk_tokens));

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int sub = lane / TPR;  // row of this thread within its warp's step
    const int col = lane % TPR;  // 8-element slice of the row

    // The group's queries are consecutive rows s*G .. s*G+G-1 of q.
    stage_rows_f32<T, D>(p.q, int64_t(s) * G, G, q_s, tid, kAttnThreads);
    __syncthreads();

    float m[GMAX], d[GMAX], acc[GMAX][8];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
        m[g] = -INFINITY;
        d[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = 0.0f;
    }

    for (int64_t base = begin; base < end; base += ROWS_PER_STEP) {
        const int32_t t = int32_t(min(base + warp * RPW + sub, int64_t(end)));
        const bool valid = t < end;
        float k[8], v[8];
        if (valid) {
            const int64_t row = seg.row(t);
            unpack8<T>(ld_global(row_vec(p.k_cache, row, D) + col), k);
            unpack8<T>(ld_global(row_vec(p.v_cache, row, D) + col), v);
        }
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
            if (g >= G) break;  // uniform over the block
            float part = 0.0f;
            if (valid) {
#pragma unroll
                for (int j = 0; j < 8; ++j) part += ld_shared(&q_s[g * D + col * 8 + j]) * k[j];
            }
            // Sum the row's TPR slices; all 32 lanes take part (TPR-lane groups are aligned).
#pragma unroll
            for (int off = TPR / 2; off > 0; off /= 2) part += __shfl_xor_sync(0xffffffffu, part, off);
            if (valid) add_row(m[g], d[g], acc[g], part * p.scale_log2, v);
        }
    }

    // Merge the RPW row groups of each warp: lanes with the same slice differ by multiples of TPR.
#pragma unroll
    for (int off = TPR; off < 32; off *= 2) {
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
            if (g >= G) break;
            const float m2 = __shfl_xor_sync(0xffffffffu, m[g], off);
            const float d2 = __shfl_xor_sync(0xffffffffu, d[g], off);
            float a2[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) a2[j] = __shfl_xor_sync(0xffffffffu, acc[g][j], off);
            merge_state(m[g], d[g], acc[g], m2, d2, a2);
        }
    }

    // Merge across warps one head at a time (keeps shared memory at 4 rows), then write.
    for (int g = 0; g < G; ++g) {
        float mg = -INFINITY, dg = 0.0f, ag[8];
#pragma unroll
        for (int gg = 0; gg < GMAX; ++gg) {
            if (gg == g) {
                mg = m[gg];
                dg = d[gg];
#pragma unroll
                for (int j = 0; j < 8; ++j) ag[j] = acc[gg][j];
            }
        }
        if (sub == 0) {
            if (col == 0) {
                warp_m[warp] = mg;
                warp_d[warp] = dg;
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) st_shared(&warp_acc[warp * D + col * 8 + j], ag[j]);
        }
        __syncthreads();
        if (warp == 0 && sub == 0) {
            float M = warp_m[0], Dn = warp_d[0], A[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) A[j] = ld_shared(&warp_acc[col * 8 + j]);
            for (int w = 1; w < kAttnWarps; ++w) {
                float A2[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) A2[j] = ld_shared(&warp_acc[w * D + col * 8 + j]);
                merge_state(M, Dn, A, warp_m[w], warp_d[w], A2);
            }
            write_head<T, D>(p, int64_t(s) * G + g, split, n_splits, col, M, Dn, A);
        }
        __syncthreads();  // warp_* are reused for the next head
    }
}

// Query row j = i * G + g of segment s (chunk query i, group head g): its row in q/out/lse,
// [batch][q_len][heads] with heads = kv_heads * G. For q_len = 1 that is s * G + g.
__device__ __forceinline__ int64_t query_row(const HwAttentionParams& p, int32_t s, int j) {
    const int64_t G = p.group_size;
    const int64_t b = s / p.kv_heads;
    const int64_t h = s % p.kv_heads;
    return (b * p.q_len + j / G) * (int64_t(p.kv_heads) * G) + h * G + j % G;
}

// Large groups (G > 4), and every chunk of q_len > 1 queries: the block stages a tile of K/V
// rows in shared memory, one 16-byte load per thread and row slice, and each warp then runs its
// own query rows (warp w takes rows w, w + 4, ...) over every row of the tile. A block serves
// GMAX query rows of its segment, the (i, g)-ordered rows blockIdx.z * GMAX onwards, so a tile
// of the whole group's heads for GMAX / G chunk positions: a K/V row is read from global memory
// once per GMAX query rows, never once per head. A thread keeps state for GMAX/4 rows instead of
// GMAX: at G = 16 the rows body needs 16 x 10 floats per thread (255 registers and spills at
// head_dim 256), this one 4 x 10. Warps own disjoint rows, so only the RPW row groups inside a
// warp merge; no cross-warp merge. Causal: chunk query i (token len - q_len + i) sees tokens
// 0 ..= len - q_len + i; for q_len = 1 that is every token. CHUNK = false is the decode
// instantiation: q_len = 1 known at compile time, so the causal bookkeeping costs no registers
// (the same function of its inputs as CHUNK = true with q_len = 1).
template <typename T, int D, int GMAX, bool CHUNK>
__device__ void attention_tiled_body(const HwAttentionParams& p) {
    constexpr int TPR = D / kElemsPerVec;
    constexpr int RPW = 32 / TPR;
    constexpr int TILE = kAttnThreads / TPR;          // rows staged per step
    constexpr int HPW = GMAX / kAttnWarps;            // query rows per warp (most)
    static_assert(GMAX % kAttnWarps == 0, "tiled attention splits the query rows over the warps");
    __shared__ float q_s[GMAX * D];
    __shared__ uint4 k_s[kAttnThreads];
    __shared__ uint4 v_s[kAttnThreads];

    const int32_t s = blockIdx.x;
    const int split = blockIdx.y;
    const int G = p.group_size;
    const int q_len = CHUNK ? p.q_len : 1;
    const int rows = G * q_len;  // the segment's query rows (host: <= 16 * 64)
    const int tile0 = CHUNK ? int(blockIdx.z) * GMAX : 0;
    const SegmentView seg = SegmentView::load(p.seg, s);
    const int n_splits = num_splits(seg.len, p.chunk_tokens);
    if (split >= n_splits) return;  // the whole block leaves together, before any barrier
    const int32_t begin = split * p.chunk_tokens;
    const int32_t end = int32_t(min(int64_t(seg.len), int64_t(begin) + p.chunk_tokens));
    // Token index of chunk query 0 (the host checked len >= q_len; an empty decode segment
    // gives -1), and the end of what the block's last query row sees.
    const int32_t first = seg.len - q_len;
    const int32_t stop = CHUNK ? min(end, first + (min(rows, tile0 + GMAX) - 1) / G + 1) : end;

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int sub = lane / TPR;
    const int col = lane % TPR;

    for (int i = tid; i < GMAX * TPR; i += kAttnThreads) {
        const int j = tile0 + i / TPR;
        if (j >= rows) break;  // i grows: no later row of this thread is in range either
        float f[8];
        unpack8<T>(ld_global(row_vec(p.q, CHUNK ? query_row(p, s, j) : int64_t(s) * G + j, D) + i % TPR), f);
#pragma unroll
        for (int e = 0; e < 8; ++e) st_shared(&q_s[i * 8 + e], f[e]);
    }

    float m[HPW], d[HPW], acc[HPW][8];
    int32_t lim[HPW];  // tokens below lim[h] are visible to the warp's row h
#pragma unroll
    for (int h = 0; h < HPW; ++h) {
        m[h] = -INFINITY;
        d[h] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[h][j] = 0.0f;
        lim[h] = first + (tile0 + warp + h * kAttnWarps) / G + 1;
    }

    for (int64_t base = begin; base < stop; base += TILE) {
        __syncthreads();  // the previous tile is consumed (and q_s written, the first time)
        const int64_t t = base + tid / TPR;
        if (t < stop) {
            const int64_t row = seg.row(int32_t(t));
            st_shared(&k_s[tid], ld_global(row_vec(p.k_cache, row, D) + tid % TPR));
            st_shared(&v_s[tid], ld_global(row_vec(p.v_cache, row, D) + tid % TPR));
        }
        __syncthreads();
#pragma unroll
        for (int r0 = 0; r0 < TILE; r0 += RPW) {
            const int r = r0 + sub;
            const bool staged = base + r < stop;
            float k[8], v[8];
            if (staged) {
                unpack8<T>(ld_shared(&k_s[r * TPR + col]), k);
                unpack8<T>(ld_shared(&v_s[r * TPR + col]), v);
            }
#pragma unroll
            for (int h = 0; h < HPW; ++h) {
                const int g = warp + h * kAttnWarps;
                if (tile0 + g >= rows) break;  // uniform over the warp
                const bool valid = staged && (!CHUNK || base + r < lim[h]);
                float part = 0.0f;
                if (valid) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) part += ld_shared(&q_s[g * D + col * 8 + j]) * k[j];
                }
#pragma unroll
                for (int off = TPR / 2; off > 0; off /= 2) part += __shfl_xor_sync(0xffffffffu, part, off);
                if (valid) add_row(m[h], d[h], acc[h], part * p.scale_log2, v);
            }
        }
    }

    // Merge the RPW row groups of the warp, then the first group writes each of its rows.
#pragma unroll
    for (int h = 0; h < HPW; ++h) {
        const int g = warp + h * kAttnWarps;
        if (tile0 + g >= rows) break;
#pragma unroll
        for (int off = TPR; off < 32; off *= 2) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m[h], off);
            const float d2 = __shfl_xor_sync(0xffffffffu, d[h], off);
            float a2[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) a2[j] = __shfl_xor_sync(0xffffffffu, acc[h][j], off);
            merge_state(m[h], d[h], acc[h], m2, d2, a2);
        }
        if (sub == 0) {
            const int64_t qh = CHUNK ? query_row(p, s, tile0 + g) : int64_t(s) * G + g;
            write_head<T, D>(p, qh, split, n_splits, col, m[h], d[h], acc[h]);
        }
    }
}

// Group buckets above 4 take the tiled body (see there); smaller ones spread rows over warps.
template <typename T, int D, int GMAX>
__device__ void attention_body(const HwAttentionParams& p) {
    if constexpr (GMAX > kAttnWarps) {
        attention_tiled_body<T, D, GMAX, false>(p);
    } else {
        attention_rows_body<T, D, GMAX>(p);
    }
}

// One warp per query row of a split segment: weights each chunk's normalized output by
// 2^(lse_c - max lse) and renormalizes. A chunk that a causal row does not reach left an empty
// state (LSE -inf) and weighs 0.
template <typename T, int D>
__device__ void attention_merge_body(const HwAttentionParams& p) {
    constexpr int TPR = D / kElemsPerVec;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int64_t qh = int64_t(blockIdx.x) * kAttnWarps + warp;  // query row R (see params.h)
    const int64_t heads = int64_t(p.kv_heads) * p.group_size;
    if (qh >= int64_t(p.seg.num_segments) * p.group_size * p.q_len || lane >= TPR) return;  // no barriers here
    const int32_t s = int32_t(qh / (heads * p.q_len) * p.kv_heads + qh % heads / p.group_size);
    const int n_splits = num_splits(p.seg.len[s], p.chunk_tokens);
    if (n_splits <= 1) return;  // written directly by the attention kernel
    const float* lse = p.partial_lse + qh * p.max_splits;
    float M = -INFINITY;
    for (int c = 0; c < n_splits; ++c) M = fmaxf(M, ld_global(lse + c));
    float W = 0.0f, o[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int c = 0; c < n_splits; ++c) {
        const float lc = ld_global(lse + c);
        const float w = lc == -INFINITY ? 0.0f : exp2f(lc - M);
        W += w;
        const float* po = p.partial_out + (qh * p.max_splits + c) * D + lane * 8;
#pragma unroll
        for (int j = 0; j < 8; ++j) o[j] += w * ld_global(po + j);
    }
    const float inv = safe_inv(W);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] *= inv;
    st_global(row_vec(p.out, qh, D) + lane, pack8<T>(o));
    if (p.lse != nullptr && lane == 0) st_global(&p.lse[qh], W == 0.0f ? -INFINITY : (M + log2f(W)) * kLn2);
}

}  // namespace hw

// Instantiation list: dtype x head_dim x group-size bucket (a launch with group size G uses the
// smallest bucket >= G; the kernel loops to the runtime G).
#define HW_ATTENTION_KERNELS(X)                                 \
    X(hw_attention_f16_d64_g1, __half, 64, 1)                   \
    X(hw_attention_f16_d64_g2, __half, 64, 2)                   \
    X(hw_attention_f16_d64_g4, __half, 64, 4)                   \
    X(hw_attention_f16_d64_g8, __half, 64, 8)                   \
    X(hw_attention_f16_d64_g16, __half, 64, 16)                 \
    X(hw_attention_f16_d128_g1, __half, 128, 1)                 \
    X(hw_attention_f16_d128_g2, __half, 128, 2)                 \
    X(hw_attention_f16_d128_g4, __half, 128, 4)                 \
    X(hw_attention_f16_d128_g8, __half, 128, 8)                 \
    X(hw_attention_f16_d128_g16, __half, 128, 16)               \
    X(hw_attention_f16_d256_g1, __half, 256, 1)                 \
    X(hw_attention_f16_d256_g2, __half, 256, 2)                 \
    X(hw_attention_f16_d256_g4, __half, 256, 4)                 \
    X(hw_attention_f16_d256_g8, __half, 256, 8)                 \
    X(hw_attention_f16_d256_g16, __half, 256, 16)               \
    X(hw_attention_bf16_d64_g1, __nv_bfloat16, 64, 1)           \
    X(hw_attention_bf16_d64_g2, __nv_bfloat16, 64, 2)           \
    X(hw_attention_bf16_d64_g4, __nv_bfloat16, 64, 4)           \
    X(hw_attention_bf16_d64_g8, __nv_bfloat16, 64, 8)           \
    X(hw_attention_bf16_d64_g16, __nv_bfloat16, 64, 16)         \
    X(hw_attention_bf16_d128_g1, __nv_bfloat16, 128, 1)         \
    X(hw_attention_bf16_d128_g2, __nv_bfloat16, 128, 2)         \
    X(hw_attention_bf16_d128_g4, __nv_bfloat16, 128, 4)         \
    X(hw_attention_bf16_d128_g8, __nv_bfloat16, 128, 8)         \
    X(hw_attention_bf16_d128_g16, __nv_bfloat16, 128, 16)       \
    X(hw_attention_bf16_d256_g1, __nv_bfloat16, 256, 1)         \
    X(hw_attention_bf16_d256_g2, __nv_bfloat16, 256, 2)         \
    X(hw_attention_bf16_d256_g4, __nv_bfloat16, 256, 4)         \
    X(hw_attention_bf16_d256_g8, __nv_bfloat16, 256, 8)         \
    X(hw_attention_bf16_d256_g16, __nv_bfloat16, 256, 16)

// Chunks (q_len > 1): the tiled body in tiles of 8 or 16 query rows (the host picks 8 when
// G * q_len <= 8).
#define HW_ATTENTION_CHUNK_KERNELS(X)                           \
    X(hw_attention_chunk_f16_d64_g8, __half, 64, 8)             \
    X(hw_attention_chunk_f16_d64_g16, __half, 64, 16)           \
    X(hw_attention_chunk_f16_d128_g8, __half, 128, 8)           \
    X(hw_attention_chunk_f16_d128_g16, __half, 128, 16)         \
    X(hw_attention_chunk_f16_d256_g8, __half, 256, 8)           \
    X(hw_attention_chunk_f16_d256_g16, __half, 256, 16)         \
    X(hw_attention_chunk_bf16_d64_g8, __nv_bfloat16, 64, 8)     \
    X(hw_attention_chunk_bf16_d64_g16, __nv_bfloat16, 64, 16)   \
    X(hw_attention_chunk_bf16_d128_g8, __nv_bfloat16, 128, 8)   \
    X(hw_attention_chunk_bf16_d128_g16, __nv_bfloat16, 128, 16) \
    X(hw_attention_chunk_bf16_d256_g8, __nv_bfloat16, 256, 8)   \
    X(hw_attention_chunk_bf16_d256_g16, __nv_bfloat16, 256, 16)

#define HW_ATTENTION_MERGE_KERNELS(X)                     \
    X(hw_attention_merge_f16_d64, __half, 64)             \
    X(hw_attention_merge_f16_d128, __half, 128)           \
    X(hw_attention_merge_f16_d256, __half, 256)           \
    X(hw_attention_merge_bf16_d64, __nv_bfloat16, 64)     \
    X(hw_attention_merge_bf16_d128, __nv_bfloat16, 128)   \
    X(hw_attention_merge_bf16_d256, __nv_bfloat16, 256)

#define HW_ATTENTION_ENTRY(name, T, D, G) \
    HW_KERNEL_ENTRY_BOUNDED(name, HwAttentionParams, hw::kAttnThreads, (hw::attention_body<T, D, G>(p)))
#define HW_ATTENTION_CHUNK_ENTRY(name, T, D, G) \
    HW_KERNEL_ENTRY_BOUNDED(name, HwAttentionParams, hw::kAttnThreads, (hw::attention_tiled_body<T, D, G, true>(p)))
#define HW_ATTENTION_MERGE_ENTRY(name, T, D) \
    HW_KERNEL_ENTRY_BOUNDED(name, HwAttentionParams, hw::kAttnThreads, (hw::attention_merge_body<T, D>(p)))
HW_ATTENTION_KERNELS(HW_ATTENTION_ENTRY)
HW_ATTENTION_CHUNK_KERNELS(HW_ATTENTION_CHUNK_ENTRY)
HW_ATTENTION_MERGE_KERNELS(HW_ATTENTION_MERGE_ENTRY)
