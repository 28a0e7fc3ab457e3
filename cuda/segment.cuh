// Segment addressing shared by every kernel: (segment, logical token index) -> cache row.
//
// Kernels never compute `offset + i` themselves. They go through SegmentView, so a paged
// variant (a block table per segment, SPEC section 2) only has to change this file.
#pragma once
#include "compat.cuh"
#include "params.h"

namespace hw {

struct SegmentView {
    int32_t offset;
    int32_t capacity;
    int32_t len;
    int32_t sink;
    int32_t ring_head;
    int32_t mode;

    __device__ __forceinline__ static SegmentView load(const HwSegmentTable& t, int32_t s) {
        SegmentView v;
        v.offset = t.offset[s];
        v.capacity = t.capacity[s];
        v.len = t.len[s];
        v.sink = t.sink[s];
        v.ring_head = t.ring_head[s];
        v.mode = t.mode[s];
        return v;
    }

    __device__ __forceinline__ int32_t window() const { return capacity - sink; }

    // Row of logical token i (0 <= i < len), oldest first. Streaming segments keep their ring
    // oldest-first from ring_head, so attention and compaction see tokens in position order.
    __device__ __forceinline__ int64_t row(int32_t i) const {
        if (mode == HW_MODE_FULL || i < sink) return int64_t(offset) + i;
        // ring_head + (i - sink) reaches 2 * window, past int32 for windows above 2^30 but not
        // past uint32 (both terms are below 2^31): unsigned 32-bit arithmetic is exact, and
        // cheaper than a 64-bit modulo.
        return int64_t(offset) + sink + (uint32_t(ring_head) + uint32_t(i - sink)) % uint32_t(window());
    }

    // Row the next appended token goes to. Full: the host has already checked len < capacity.
    // Streaming: sinks fill first, then the ring slot after the newest token; once the ring is
    // full that is the oldest slot, reused. A ring that is not full starts at ring_head = 0,
    // except after a rollback, which drops its newest tokens and keeps ring_head.
    __device__ __forceinline__ int64_t append_row() const {
        if (mode == HW_MODE_FULL || len < sink) return int64_t(offset) + len;
        return int64_t(offset) + sink + (uint32_t(ring_head) + uint32_t(len - sink)) % uint32_t(window());  // as row()
    }

    // State after one append (see append_row).
    __device__ __forceinline__ void advance(int32_t* new_len, int32_t* new_ring_head) const {
        if (mode == HW_MODE_FULL || len < capacity) {
            *new_len = len + 1;
            *new_ring_head = ring_head;
        } else {
            *new_len = len;
            *new_ring_head = (ring_head + 1) % window();
        }
    }
};

}  // namespace hw
