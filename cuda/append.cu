// Append decoded tokens (one, or a chunk of several) to every segment of a layer, and regrow
// (relayout) a layer.
//
// Append is O(tokens) per segment: one K row and one V row per token are written where the
// segment's mode says (Full: row len; Streaming: sinks, then the ring), and len/ring_head
// advance on the device so the next launch needs no host round trip. One warp per segment: a
// row is 8..32 uint4 for head_dim 64..256, so a warp moves both rows of a token in one or two
// vector steps. Both supported dtypes are 16-bit, and append only moves rows, so one
// instantiation per head_dim serves f16 and bf16 alike.
#include "compat.cuh"
#include "params.h"
#include "segment.cuh"
#include "vec.cuh"

namespace hw {

constexpr int kAppendWarpsPerBlock = 4;

template <int HEAD_DIM>
__device__ void append_body(const HwAppendParams& p) {
    constexpr int kVecsPerRow = HEAD_DIM / kElemsPerVec;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int32_t s = blockIdx.x * kAppendWarpsPerBlock + warp;
    if (s >= p.seg.num_segments) return;  // whole warps only: no barrier below spans warps

    // The tokens go in order, each on the state the previous one left (kept in registers), so a
    // ring that wraps inside the chunk overwrites exactly as `tokens` single appends would.
    SegmentView seg = SegmentView::load(p.seg, s);
    // Token t of segment s = (b, h) is row (b * tokens + t) * kv_heads + h of k_new/v_new.
    const int64_t first = (s / p.kv_heads) * int64_t(p.tokens) * p.kv_heads + s % p.kv_heads;
    const uint4* k_src = row_vec(p.k_new, first, HEAD_DIM);
    const uint4* v_src = row_vec(p.v_new, first, HEAD_DIM);
    const int64_t stride = int64_t(p.kv_heads) * kVecsPerRow;
    for (int32_t t = 0; t < p.tokens; ++t, k_src += stride, v_src += stride) {
        const int64_t dst = seg.append_row();
        uint4* k_dst = row_vec(p.k_cache, dst, HEAD_DIM);
        uint4* v_dst = row_vec(p.v_cache, dst, HEAD_DIM);
        for (int i = lane; i < 2 * kVecsPerRow; i += 32) {
            if (i < kVecsPerRow) {
                st_global(k_dst + i, ld_global(k_src + i));
            } else {
                st_global(v_dst + (i - kVecsPerRow), ld_global(v_src + (i - kVecsPerRow)));
            }
        }
        int32_t new_len, new_head;
        seg.advance(&new_len, &new_head);
        seg.len = new_len;
        seg.ring_head = new_head;
    }
    // Every lane read the old len/ring_head at load; only then may one lane write the new ones.
    __syncwarp();
    if (lane == 0) {
        p.seg.len[s] = seg.len;
        p.seg.ring_head[s] = seg.ring_head;
    }
}

// One block per segment, rows strided over the block: regrow is rare and bandwidth-bound.
template <int HEAD_DIM>
__device__ void relayout_body(const HwRelayoutParams& p) {
    constexpr int kVecsPerRow = HEAD_DIM / kElemsPerVec;
    const int32_t s = blockIdx.x;
    const int64_t src = p.src_offset[s];
    const int64_t dst = p.dst_offset[s];
    const int64_t n = int64_t(p.len[s]) * kVecsPerRow;
    const uint4* ks = row_vec(p.k_src, src, HEAD_DIM);
    const uint4* vs = row_vec(p.v_src, src, HEAD_DIM);
    uint4* kd = row_vec(p.k_dst, dst, HEAD_DIM);
    uint4* vd = row_vec(p.v_dst, dst, HEAD_DIM);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        st_global(kd + i, ld_global(ks + i));
        st_global(vd + i, ld_global(vs + i));
    }
}

}  // namespace hw

// The instantiation list: the only place kernel names are spelled. build.rs reads the names
// from it for both the fatbin symbol table and the emulator entry points.
#define HW_APPEND_KERNELS(X)            \
    X(hw_append_d64, append_body<64>)   \
    X(hw_append_d128, append_body<128>) \
    X(hw_append_d256, append_body<256>)

#define HW_RELAYOUT_KERNELS(X)                  \
    X(hw_relayout_d64, relayout_body<64>)       \
    X(hw_relayout_d128, relayout_body<128>)     \
    X(hw_relayout_d256, relayout_body<256>)

#define HW_APPEND_ENTRY(name, body) \
    HW_KERNEL_ENTRY_BOUNDED(name, HwAppendParams, 32 * hw::kAppendWarpsPerBlock, (hw::body(p)))
#define HW_RELAYOUT_ENTRY(name, body) \
    HW_KERNEL_ENTRY_BOUNDED(name, HwRelayoutParams, 256, (hw::body(p)))
HW_APPEND_KERNELS(HW_APPEND_ENTRY)
HW_RELAYOUT_KERNELS(HW_RELAYOUT_ENTRY)
