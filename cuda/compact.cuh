// In-place compaction of one Full segment's rows to a kept set, shared by R-KV's select
// (redundancy.cu) and the H2O eviction (heavy_hitters.cu). Block-wide, kTopThreads threads.
#pragma once
#include "compat.cuh"
#include "segment.cuh"
#include "topk.cuh"
#include "vec.cuh"

namespace hw {

// Moves logical token kept[r] to position r for r < count, K and V rows (and, when mass is not
// null, the row's f32 mass entry). kept[] ascends with kept[r] >= r, so a destination row never
// holds a source of a later step; within a step a destination may be another lane's source, so
// every lane reads before any lane writes.
template <int D>
__device__ __forceinline__ void compact_rows(void* k_cache, void* v_cache, float* mass, const SegmentView& seg,
                                             const int32_t* kept, int32_t count) {
    constexpr int VPR = D / kElemsPerVec;
    constexpr int kRowsPerStep = kTopThreads / VPR;
    const int tid = threadIdx.x;
    for (int32_t r0 = 0; r0 < count; r0 += kRowsPerStep) {
        const int32_t rr = r0 + tid / VPR;
        const int c = tid % VPR;
        const bool live = rr < count;
        uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
        float mv = 0.0f;
        int64_t from = 0;
        if (live) {
            from = seg.row(kept[rr]);
            kv = ld_global(row_vec(k_cache, from, D) + c);
            vv = ld_global(row_vec(v_cache, from, D) + c);
            if (mass != nullptr && c == 0) mv = ld_global(mass + from);
        }
        __syncthreads();
        if (live) {
            const int64_t to = seg.row(rr);
            st_global(row_vec(k_cache, to, D) + c, kv);
            st_global(row_vec(v_cache, to, D) + c, vv);
            if (mass != nullptr && c == 0) st_global(mass + to, mv);
        }
        __syncthreads();
    }
}

}  // namespace hw
