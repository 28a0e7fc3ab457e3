// Prompt addressing shared by the prefill kernels (select.cu, scores.cu): (segment, token) ->
// K/V row, (segment, window query) -> query row, and the spans of the per-row buffers whose
// rows have one entry per prompt token or per prefix token. HwPromptShape (params.h) says which
// form the prompt has: head-major with one length, or token-major packed with cu_seqlens
// (flash-attn varlen / FlashInfer ragged), each sequence its own length.
#pragma once
#include "compat.cuh"
#include "params.h"
#include "vec.cuh"

namespace hw {

// One (sequence, KV head) of the prompt.
struct PromptSeg {
    int64_t start;  // the sequence's first token in the packed token order
    int32_t len;    // its tokens
    int32_t b, h;   // sequence, KV head

    __device__ __forceinline__ static PromptSeg load(const HwPromptShape& p, int64_t s) {
        PromptSeg g;
        g.b = int32_t(s / p.kv_heads);
        g.h = int32_t(s % p.kv_heads);
        if (p.cu_seqlens != nullptr) {
            g.start = ld_global(p.cu_seqlens + g.b);
            g.len = int32_t(ld_global(p.cu_seqlens + g.b + 1) - g.start);
        } else {
            g.start = int64_t(g.b) * p.q_len;
            g.len = p.q_len;
        }
        return g;
    }

    // Prefix tokens (scored ones): the window is always kept.
    __device__ __forceinline__ int32_t prefix(const HwPromptShape& p) const { return len - p.window; }

    // K/V row of token t: [total][kv_heads] token-major, or the sequence's [kv_heads][len]
    // block head-major ([batch][kv_heads][q_len] with one length).
    __device__ __forceinline__ int64_t key_row(const HwPromptShape& p, int32_t t) const {
        return p.token_major ? (start + t) * p.kv_heads + h : start * p.kv_heads + int64_t(h) * len + t;
    }

    // Query row of window query i of query head g of this KV head: the engine's whole
    // [total][kv_heads * G] query tensor token-major (only the last window tokens are read), or
    // the window queries alone, [segments][G][window], head-major.
    __device__ __forceinline__ int64_t query_row(const HwPromptShape& p, int32_t g_i) const {
        const int32_t g = g_i / p.window, i = g_i % p.window;
        if (p.token_major)
            return (start + len - p.window + i) * (int64_t(p.kv_heads) * p.group_size) + int64_t(h) * p.group_size + g;
        return (int64_t(b) * p.kv_heads + h) * p.group_size * p.window + g_i;
    }
};

// Where buffer row `row` lives when each (sequence, KV head) has `per_seg` rows (1, or G for
// per-query-head rows) of one entry per token (`all`) or per prefix token (`prefix`): rows of a
// sequence are contiguous, sequences follow each other. With one length these are row * q_len
// and row * (q_len - window).
struct RowSpan {
    int64_t all, prefix;
    int32_t len, n;
    int64_t seg;  // the (sequence, KV head) the row belongs to

    __device__ __forceinline__ static RowSpan load(const HwPromptShape& p, int64_t row, int32_t per_seg) {
        RowSpan r;
        r.seg = row / per_seg;
        const PromptSeg g = PromptSeg::load(p, r.seg);
        const int64_t rows_per_seq = int64_t(p.kv_heads) * per_seg;
        const int64_t j = row - int64_t(g.b) * rows_per_seq;
        r.len = g.len;
        r.n = g.len - p.window;
        r.all = g.start * rows_per_seq + j * g.len;
        r.prefix = (g.start - int64_t(g.b) * p.window) * rows_per_seq + j * r.n;
        return r;
    }
};

}  // namespace hw
