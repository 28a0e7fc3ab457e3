// Tensor-core tiles shared by the scoring kernels (select.cu, redundancy.cu): a slab of 32
// query (or key) rows times a tile of keys, both staged in shared memory, multiplied with WMMA
// m16n16k16 into f32 logits.
#pragma once
#include "compat.cuh"
#include "vec.cuh"

namespace hw {

constexpr int kSlabRows = 32;  // rows per WMMA slab (two 16-row fragments)

// Keys per tile: a 16 KB K tile for every head_dim, so the static shared memory of the score
// kernel (Q slab + K tile + logits + per-head sums) stays under the 48 KB default.
template <int D>
struct KeyTile {
    static constexpr int TOK = 8192 / D;
};

// Stages ROWS rows of D elements into dst ([ROWS][D], 16-byte vectors): row i < count comes
// from row row_of(i) of base, rows past count are zeros (their products are masked by callers).
template <int D, int ROWS, int THREADS, class RowOf>
__device__ __forceinline__ void stage_rows(const void* base, int count, RowOf row_of, void* dst) {
    constexpr int VPR = D / kElemsPerVec;
    for (int v = threadIdx.x; v < ROWS * VPR; v += THREADS) {
        const int r = v / VPR, c = v % VPR;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < count) val = ld_global(row_vec(base, row_of(r), D) + c);
        st_shared(reinterpret_cast<uint4*>(dst) + v, val);
    }
}

// logit_s[r][t] = q_s[r] . k_s[t] (unscaled) for a slab of kSlabRows queries and a tile of TOK
// keys: A = Q (row-major, ldm D), B = K^T, i.e. the K tile read column-major with ldm D.
template <typename T, int D, int WARPS>
__device__ void slab_logits(const T* q_s, const T* k_s, float* logit_s) {
    using namespace nvcuda;
    constexpr int TOK = KeyTile<D>::TOK;
    constexpr int MT = kSlabRows / 16, NT = TOK / 16;
    const int warp = threadIdx.x / 32;
    for (int tile = warp; tile < MT * NT; tile += WARPS) {
        const int mi = tile % MT, ni = tile / MT;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int kk = 0; kk < D; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
            wmma::load_matrix_sync(a, q_s + mi * 16 * D + kk, D);
            wmma::load_matrix_sync(b, k_s + ni * 16 * D + kk, D);
            wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(logit_s + mi * 16 * TOK + ni * 16, acc, TOK, wmma::mem_row_major);
    }
}

// Folds the online-softmax state (m2, l2) into (m, l): base-2 logits, l = sum of exp2(x - m).
// An empty state is (-inf, 0); a NaN logit makes l NaN, and NaN must survive every fold.
__device__ __forceinline__ void merge_softmax(float& m, float& l, float m2, float l2) {
    const float mn = fmaxf(m, m2);
    if (mn == -INFINITY) {
        l += l2;  // exp2(-inf - -inf) would be NaN: both sides are empty (0) or NaN
        return;
    }
    l = l * exp2f(m - mn) + l2 * exp2f(m2 - mn);
    m = mn;
}

}  // namespace hw
