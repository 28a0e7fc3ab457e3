/* Launch-parameter structs shared by the CUDA kernels, the CPU SIMT emulator and Rust.
 *
 * Plain C, fixed-width fields, no padding surprises: Rust mirrors this file through bindgen
 * (src/params.rs, committed; tests/bindgen_fresh.rs regenerates it and fails on any drift).
 * Every kernel takes exactly one of these structs by value. Pointers are device addresses on
 * the GPU and host addresses under the emulator; the kernels never tell the difference. */
#ifndef HEADWISE_PARAMS_H
#define HEADWISE_PARAMS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Segment modes (SPEC section 2). */
#define HW_MODE_FULL 0
#define HW_MODE_STREAMING 1

/* Device mirror of one layer's segment table: one entry per (sequence, KV head), segment
 * s = sequence * num_kv_heads + kv_head. All counts are rows of head_dim elements.
 * Each pointer addresses an int32 array of num_segments entries; the host allocates them as
 * one buffer (see src/layout.rs, DeviceTableLayout). Kernels that append or compact update
 * len/ring_head in place; the host keeps the authoritative copy and validates before launch.
 *
 *  Full:      logical token i (0 <= i < len) lives at row offset + i.
 *  Streaming: capacity = sink + window. Logical i < sink lives at offset + i; the ring holds the
 *             rest, oldest first starting at ring slot ring_head:
 *             row = offset + sink + (ring_head + i - sink) % window. ring_head stays 0 until the
 *             ring is full; after that it names the oldest slot, which the next append
 *             overwrites. */
typedef struct HwSegmentTable {
    const int32_t* offset;
    const int32_t* capacity;
    int32_t* len;
    const int32_t* sink;
    int32_t* ring_head;
    const int32_t* mode;
    int32_t num_segments;
} HwSegmentTable;

/* Append one token (K row and V row) to every segment of a layer.
 * k_new/v_new: [num_segments][head_dim] (i.e. [batch][kv_heads][head_dim]), dtype of the cache.
 * k_cache/v_cache: [total_rows][head_dim]. 16-byte aligned (checked on the host). */
typedef struct HwAppendParams {
    void* k_cache;
    void* v_cache;
    const void* k_new;
    const void* v_new;
    HwSegmentTable seg;
    int32_t head_dim;
} HwAppendParams;

/* Copy every segment's rows from one layout to another (regrow: an explicit O(total rows)
 * operation, never per step). Segment s keeps its mode, len, sink and ring_head; its rows move
 * from src.offset[s] to dst.offset[s] (physical order preserved, so a ring stays valid).
 * src and dst caches must not overlap. */
typedef struct HwRelayoutParams {
    const void* k_src;
    const void* v_src;
    void* k_dst;
    void* v_dst;
    const int32_t* src_offset;
    const int32_t* dst_offset;
    const int32_t* len;
    int32_t num_segments;
    int32_t head_dim;
} HwRelayoutParams;

/* Decode attention over every segment of a layer (SPEC section 5). Query head
 * qh = kv_head * group_size + g of sequence b attends over segment s = b * num_kv_heads + kv_head.
 * q:   [num_segments * group_size][head_dim] (= [batch][heads][head_dim]), KV dtype.
 * out: same shape, KV dtype. lse: [num_segments * group_size] f32 natural-log sum of
 *      exp(scaled logits), or NULL; an empty segment gives out = 0, lse = -inf.
 * Segments longer than chunk_tokens are split over gridDim.y = max_splits blocks; split c of
 * segment s covers tokens [c * chunk_tokens, min(len, (c + 1) * chunk_tokens)) and, when the
 * segment has more than one split, writes normalized partial outputs and base-2 LSEs to the
 * workspace ([num_segments * group_size][max_splits][head_dim] and [..][max_splits], f32),
 * which the merge kernel combines. */
typedef struct HwAttentionParams {
    const void* q;
    const void* k_cache;
    const void* v_cache;
    HwSegmentTable seg;
    void* out;
    float* lse;
    float* partial_out;
    float* partial_lse;
    int32_t group_size;
    int32_t head_dim;
    int32_t chunk_tokens;
    int32_t max_splits;
    float scale_log2; /* softmax scale * log2(e): logits are kept in base 2 */
} HwAttentionParams;

/* Launch geometry handed to the emulator (the GPU path passes the same numbers to the driver). */
typedef struct HwLaunch {
    uint32_t grid_x, grid_y, grid_z;
    uint32_t block_x, block_y, block_z;
    uint32_t dyn_smem_bytes;
} HwLaunch;

/* Where the emulator reports a kernel bug (barrier divergence, deadlock, bad shuffle mask...):
 * a NUL-terminated message naming block, thread, lane and source line. */
#define HW_EMU_ERROR_LEN 1024
typedef struct HwEmuError {
    char message[HW_EMU_ERROR_LEN];
} HwEmuError;

#ifdef __cplusplus
}
#endif

#endif /* HEADWISE_PARAMS_H */
