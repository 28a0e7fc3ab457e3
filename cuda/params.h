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
 *             row = offset + sink + (ring_head + i - sink) % window. The next token goes to
 *             ring slot (ring_head + len - sink) % window: once the ring is full that is the
 *             oldest slot, overwritten. ring_head stays 0 until the ring first fills; only a
 *             rollback (dropping the newest tokens) leaves a ring not full with ring_head != 0.
 *             ring_head is 0 whenever the ring is empty (len <= sink). */
typedef struct HwSegmentTable {
    const int32_t* offset;
    const int32_t* capacity;
    int32_t* len;
    const int32_t* sink;
    int32_t* ring_head;
    const int32_t* mode;
    int32_t num_segments;
} HwSegmentTable;

/* Append `tokens` tokens (K row and V row each) to every segment of a layer, oldest first.
 * k_new/v_new: [batch][tokens][kv_heads][head_dim] (token-major, as a model produces them; one
 * token is [num_segments][head_dim]), dtype of the cache. Segment s = b * kv_heads + h takes
 * row (b * tokens + i) * kv_heads + h for its token i.
 * k_cache/v_cache: [total_rows][head_dim]. 16-byte aligned (checked on the host). */
typedef struct HwAppendParams {
    void* k_cache;
    void* v_cache;
    const void* k_new;
    const void* v_new;
    HwSegmentTable seg;
    int32_t head_dim;
    int32_t tokens;
    int32_t kv_heads;
} HwAppendParams;

/* Copy every segment's rows from one layout to another (regrow: an explicit O(total rows)
 * operation, never per step). Segment s keeps its mode, len, sink and ring_head; its rows move
 * from src.offset[s] to dst.offset[s] (physical order preserved, so a ring stays valid); len[s]
 * is the leading rows to copy (the segment's len, or its capacity for a ring that a rollback
 * left not full with ring_head != 0). src and dst caches must not overlap. */
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
 * qh = kv_head * group_size + g of sequence b attends over segment s = b * kv_heads + kv_head.
 * q_len queries per sequence (1: decode; more: a chunk whose q_len tokens are the last q_len of
 * every segment, causal: query i sees the segment's logical tokens 0 .. len - q_len + i).
 * q:   [batch][q_len][heads][head_dim] (heads = kv_heads * group_size), KV dtype; query row
 *      R = (b * q_len + i) * heads + qh. For q_len = 1 that is [num_segments * group_size].
 * out: same shape, KV dtype. lse: [batch][q_len][heads] f32 natural-log sum of
 *      exp(scaled logits), or NULL; an empty segment gives out = 0, lse = -inf.
 * The kernels with a group bucket above 4 (the tiled body) take q_len > 1: the segment's
 * group_size * q_len query rows, ordered (i, g), go in tiles of the bucket's size over
 * gridDim.z; the others take q_len = 1 only (the host chooses).
 * Segments longer than chunk_tokens are split over gridDim.y = max_splits blocks; split c of
 * segment s covers tokens [c * chunk_tokens, min(len, (c + 1) * chunk_tokens)) and, when the
 * segment has more than one split, writes normalized partial outputs and base-2 LSEs to the
 * workspace ([query rows R][max_splits][head_dim] and [..][max_splits], f32), which the merge
 * kernel combines. */
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
    int32_t q_len;
    int32_t kv_heads;
    float scale_log2; /* softmax scale * log2(e): logits are kept in base 2 */
} HwAttentionParams;

/* Prefill compression of one layer (SPEC section 3): score, select, gather. One struct serves
 * the five kernels of cuda/select.cu (stats, stats_merge, score, pool, adakv, select, gather),
 * each reading the fields it needs.
 *
 * Source segment s (= sequence * kv_heads + kv_head) has its sequence's len tokens (`prompt`,
 * HwPromptShape: rows of k/v and of the G query heads' window queries per cuda/prompt.cuh).
 * Window query i (position n + i, n = len - window) sees every prefix key and window keys
 * 0..=i. Logits are scale * q.k, kept in base 2 (scale_log2 = scale * log2(e)).
 *
 * Score rows: one per source segment (per_query_head = 0: the group reduced by gqa_mode), or
 * one per query head (per_query_head = 1, row s * G + g). Row r has its sequence's n prefix
 * scores; "[rows][n]" and "[rows][len]" below are rows of those lengths back to back (RowSpan
 * in prompt.cuh; with one length, row r starts at r * n and r * q_len).
 *   stats:         [num_segments][splits][G * window][2] f32: per-split (max, sum of exp2)
 *   final_stats:   [num_segments][G * window][2] f32: merged over splits
 *   scores:        [rows][n] f32, the reduced per-token score before pooling
 *   keys:          [rows][n] u32, pooled scores as order-preserving keys (NaN lowest)
 *   budgets:       [rows] i32 tokens to keep, window included (>= window); AdaKV or the
 *                  threshold kernel writes them
 *   kept:          [rows][len] i32 kept positions, ascending, min(budget, len) of them
 * The destination table `seg` has `rows` Full segments whose len the host has set to
 * min(budget, len); gather copies the kept rows there. */
#define HW_POOL_MAX 0
#define HW_POOL_AVG 1
#define HW_GQA_MEAN 0
#define HW_GQA_MAX 1
/* A prompt's shape (cuda/prompt.cuh). Sequence b has cu_seqlens[b + 1] - cu_seqlens[b] tokens
 * (int32, device memory, batch + 1 entries, the first 0), or q_len each when cu_seqlens is NULL
 * (then q_len is every length, else the longest). Every length is at least `window`.
 * Head-major (token_major 0): K/V rows [batch][kv_heads][len] (a sequence's block of kv_heads x
 * its len rows), queries the window's [batch][kv_heads * group_size][window].
 * Token-major (1), packed: K/V rows [total tokens][kv_heads], queries [total tokens][kv_heads *
 * group_size] (every token's; the last `window` of each sequence are read). */
typedef struct HwPromptShape {
    const int32_t* cu_seqlens;
    int32_t batch;
    int32_t kv_heads;
    int32_t group_size;
    int32_t q_len;
    int32_t window;
    int32_t token_major;
} HwPromptShape;

typedef struct HwSelectParams {
    const void* k;
    const void* v;
    const void* queries;
    float* stats;
    float* final_stats;
    float* scores;
    uint32_t* keys;
    int32_t* budgets;
    int32_t* kept;
    void* k_cache;
    void* v_cache;
    HwSegmentTable seg;
    HwPromptShape prompt;
    int32_t num_segments;
    int32_t head_dim;
    int32_t pool_kernel;
    int32_t pool_mode;
    int32_t gqa_mode;
    int32_t per_query_head;
    int32_t chunk_tokens; /* tokens per split in the stats and score passes, a multiple of the tile */
    int32_t splits;
    float scale_log2;
    /* AdaKV (SPEC section 3): rows_per_sequence score rows share a pool of
     * rows_per_sequence * adakv_prefix_budget prefix tokens; row h then keeps
     * rint(c_h * adakv_keep + adakv_floor) prefix tokens plus the window. */
    int32_t rows_per_sequence;
    int32_t adakv_prefix_budget;
    int32_t adakv_floor;
    float adakv_keep;
    /* Prefill sinks: the first `sink` tokens of each sequence rank above every score (their
     * pooled key is order_key(+inf), and ties go to the lower position); AdaKV gives every row at
     * least min(sink, n) prefix tokens. */
    int32_t sink;
    /* Threshold keep (select_threshold): a row keeps its prefix tokens whose pooled key is at
     * least threshold_key (order_key of the threshold), plus the window. */
    uint32_t threshold_key;
} HwSelectParams;

/* One R-KV eviction step for one layer (SPEC section 4), cuda/redundancy.cu. The host picks
 * the target segments (Full, len > budget) and passes their indices; kernel block x serves
 * targets[x]. Per target t with L = seg.len[targets[t]] tokens, n = L - alpha candidates:
 *   importance:  [num_targets][max_len] f32, mean attention of the last queries (before pooling)
 *   inv_norm:    [num_targets][max_len] f32, 1 / (||k_i|| + 1e-8)
 *   col_partial: [num_targets][row_tiles][max_len] f32, row_tiles = ceil(max_len / 32): per
 *                32-row tile, the column sums of the similarity matrix S (diagonal and each
 *                row's forgiven entry excluded)
 *   col_mean:    [num_targets][max_len] f32, mean_i S[i][j]
 *   keys:        [num_targets][max_len] u32, order-preserving keys of the candidates' scores
 *   kept:        [num_targets][budget] i32, kept positions, ascending
 * ring: the query ring, [num_segments * group_size][alpha][head_dim] (KV dtype); slots
 * 0 .. ring_count are valid (a ring fills slots in order and only wraps once full, and the
 * importance does not depend on the order of the queries). Compaction rewrites rows 0 .. budget
 * of each target in place and sets its len to budget. */
typedef struct HwRkvParams {
    void* k_cache;
    void* v_cache;
    HwSegmentTable seg;
    const int32_t* targets;
    int32_t num_targets;
    const void* ring;
    int32_t ring_count;
    int32_t group_size;
    int32_t head_dim;
    int32_t alpha;
    int32_t budget;
    int32_t pool_kernel;
    int32_t max_len;
    int32_t fidelity_quirk;
    float lambda;
    float scale_log2;
    float* importance;
    float* inv_norm;
    float* col_partial;
    float* col_mean;
    uint32_t* keys;
    int32_t* kept;
} HwRkvParams;

/* Push one decode step's queries into the ring: q is [heads][head_dim] (KV dtype); head h's
 * query goes to slot `slot` of ring [heads][alpha][head_dim]. */
typedef struct HwQueryPushParams {
    void* ring;
    const void* q;
    int32_t heads;
    int32_t head_dim;
    int32_t alpha;
    int32_t slot;
} HwQueryPushParams;

/* Expected Attention scores (kvpress ExpectedAttentionPress) of one layer's prompt, for
 * select::compress_into_scored. k/v: the prompt's keys and values as HwPromptShape says (KV
 * dtype). mean: [num_segments][G][head_dim] f32, the expected query of each query head; cov:
 * [num_segments][G][head_dim][head_dim] f32 or NULL (no covariance term).
 * Per query head g: logit_t = mean_g . k_t / sqrt(d) + k_t^T cov_g k_t / (2 d) over the
 * sequence's keys but the first `sink` (kvpress drops them), softmax over those, mean over the
 * group, then (score + epsilon) * ||v_t|| when use_vnorm; the sinks score +inf (kept first).
 * Output: scores, one row per segment of its len - window prefix tokens (RowSpan prefix, f32).
 * logits: scratch, one row per query head of its len tokens (RowSpan all, per_seg G). */
typedef struct HwScoreParams {
    const void* k;
    const void* v;
    const float* mean;
    const float* cov;
    float* logits;
    float* scores;
    HwPromptShape prompt;
    int32_t num_segments;
    int32_t head_dim;
    int32_t sink;
    float epsilon;
    int32_t use_vnorm;
} HwScoreParams;

/* H2O-style accumulated attention mass (cuda/heavy_hitters.cu). mass: [total_rows] f32, one
 * entry per cache row, indexed like the K/V rows (the row SegmentView gives for a segment's
 * logical token), so a Streaming ring slot's entry follows the slot.
 *
 * mass kernel (after decode attention and its merge): for each token t of segment s, row r,
 *   mass[r] += sum over g < group_size of exp2(scale_log2 * q[s * G + g] . k[r] - lse[s * G + g] * log2(e))
 * with lse the decode attention's natural-log LSE ([num_segments * group_size] f32). Grid
 * (num_segments, ceil(max_len / tokens_per_block)); block y covers tokens
 * [y * tokens_per_block, (y + 1) * tokens_per_block) of each segment; one thread adds to each row.
 *
 * evict kernel: one block per target segment targets[x] (Full, len L > budget): the
 * budget - recent best-mass tokens among the n = L - recent older ones (order-preserving keys
 * in keys [num_targets][max_len], NaN lowest, ties to the lower position) plus the recent
 * newest, kept positions ascending in kept [num_targets][budget]; K, V and mass rows compacted
 * in place in position order, mass of the freed rows budget .. L zeroed, len set to budget. */
typedef struct HwH2oParams {
    const void* q;
    void* k_cache;
    void* v_cache;
    HwSegmentTable seg;
    const float* lse;
    float* mass;
    const int32_t* targets;
    uint32_t* keys;
    int32_t* kept;
    int32_t num_targets;
    int32_t group_size;
    int32_t head_dim;
    int32_t tokens_per_block;
    int32_t budget;
    int32_t recent;
    int32_t max_len;
    float scale_log2;
} HwH2oParams;

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
