/* The C ABI as an engine sees it: include/headwise.h, linked against libheadwise.
 *
 * Built and run by tests/capi_c.rs (cargo test --features capi), against the shared and the
 * static library. Needs no GPU: it checks the error paths (NULL pointers, bad sizes, invalid
 * layouts -> the right code and a non-empty message), the layout functions and the policy
 * functions on known answers, that the GPU entry points report HEADWISE_ERROR_NO_GPU (or
 * _NO_KERNELS for a build without nvcc) where there is no GPU, and runs every cache operation
 * on an emulator store (prefill compression, AdaKV, append, decode attention against a
 * reference computed here, the query ring, R-KV eviction, relayout, a speculative step of
 * multi-token append, chunk attention and rollback), checking the results.
 * Exit status 0 when every check passed. */

#include "headwise.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int checks = 0;
static int failures = 0;
static char message[2048];

static const char *last_message(void) {
    headwise_last_error_message(message, sizeof message);
    return message;
}

#define CHECK(cond)                                                                 \
    do {                                                                            \
        checks++;                                                                   \
        if (!(cond)) {                                                              \
            failures++;                                                             \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                           \
    } while (0)

/* A call must return `want`, leave the same code as the thread's last error, and leave a
 * message: empty after success, non-empty (and containing `needle` when given) after an error. */
#define EXPECT(call, want, needle) expect_status((call), (want), (needle), #call, __LINE__)

static void expect_status(int got, int want, const char *needle, const char *what, int line) {
    const char *m = last_message();
    int ok = got == want && headwise_last_error_code() == want;
    if (want == HEADWISE_OK) {
        ok = ok && m[0] == '\0';
    } else {
        ok = ok && m[0] != '\0' && (needle == NULL || strstr(m, needle) != NULL);
    }
    checks++;
    if (!ok) {
        failures++;
        fprintf(stderr, "%s:%d: %s\n    returned %s (%d), expected %s; message \"%s\"%s%s\n", __FILE__, line,
                what, headwise_status_name(got), got, headwise_status_name(want), m,
                needle ? ", expected to contain " : "", needle ? needle : "");
    }
}

#define OK(call) EXPECT(call, HEADWISE_OK, NULL)
#define INVALID(call, needle) EXPECT(call, HEADWISE_ERROR_INVALID_ARGUMENT, needle)

/* A non-NULL value that is not a handle: a failed creation must overwrite it with NULL. */
static int sentinel_storage;
#define SENTINEL ((void *)&sentinel_storage)

static void test_status_codes_and_messages(void) {
    const int codes[] = {HEADWISE_OK,
                         HEADWISE_ERROR_INVALID_ARGUMENT,
                         HEADWISE_ERROR_SEGMENT_FULL,
                         HEADWISE_ERROR_NO_GPU,
                         HEADWISE_ERROR_NO_KERNELS,
                         HEADWISE_ERROR_DRIVER,
                         HEADWISE_ERROR_EMULATOR,
                         HEADWISE_ERROR_PANIC,
                         HEADWISE_ERROR_INVARIANT,
                         HEADWISE_ERROR_FEATURE_OFF};
    const size_t n = sizeof codes / sizeof codes[0];
    for (size_t i = 0; i < n; i++) {
        CHECK(strcmp(headwise_status_name(codes[i]), "HEADWISE_UNKNOWN") != 0);
        for (size_t j = 0; j < i; j++) {
            CHECK(codes[i] != codes[j]);
            CHECK(strcmp(headwise_status_name(codes[i]), headwise_status_name(codes[j])) != 0);
        }
    }
    CHECK(HEADWISE_OK == 0);
    CHECK(strcmp(headwise_status_name(HEADWISE_ERROR_SEGMENT_FULL), "HEADWISE_ERROR_SEGMENT_FULL") == 0);
    CHECK(strcmp(headwise_status_name(12345), "HEADWISE_UNKNOWN") == 0);

    /* A failure leaves a message; the getters neither clear nor change it. */
    uint32_t budget = 0;
    INVALID(headwise_budget_uniform(32, 32, &budget), "capacity");
    size_t full_len = headwise_last_error_message(NULL, 0);
    CHECK(full_len > 8);
    CHECK(full_len == strlen(last_message()));
    CHECK(headwise_last_error_code() == HEADWISE_ERROR_INVALID_ARGUMENT);

    /* snprintf-style truncation, always NUL-terminated. */
    char small[8];
    memset(small, 'x', sizeof small);
    CHECK(headwise_last_error_message(small, sizeof small) == full_len);
    CHECK(small[7] == '\0' && strlen(small) == 7);
    CHECK(strncmp(small, message, 7) == 0);
    char one[1] = {'x'};
    CHECK(headwise_last_error_message(one, 1) == full_len && one[0] == '\0');

    /* A success clears it. */
    OK(headwise_budget_uniform(2048, 32, &budget));
    CHECK(budget == 2048);
    CHECK(headwise_last_error_message(NULL, 0) == 0);
    CHECK(headwise_last_error_code() == HEADWISE_OK);
}

/* Segment 0: Full, rows 0..10, 4 in use. Segment 1: Streaming 4 + 8 at rows 10..22. */
static const uint32_t OFFSET[2] = {0, 10};
static const uint32_t CAPACITY[2] = {10, 12};
static const uint32_t LEN[2] = {4, 0};
static const int32_t MODE[2] = {HEADWISE_MODE_FULL, HEADWISE_MODE_STREAMING};
static const uint32_t SINK[2] = {0, 4};
static const uint32_t WINDOW[2] = {0, 8};

static void test_layout_queries(void) {
    HeadwiseLayout *layout = SENTINEL;
    OK(headwise_layout_create(1, 2, 22, 2, OFFSET, CAPACITY, LEN, NULL, MODE, SINK, WINDOW, &layout));
    CHECK(layout != NULL && layout != SENTINEL);

    size_t batch = 0, kv_heads = 0, segments = 0, table_len = 0;
    uint64_t total_rows = 0, in_use = 0;
    OK(headwise_layout_batch(layout, &batch));
    OK(headwise_layout_kv_heads(layout, &kv_heads));
    OK(headwise_layout_num_segments(layout, &segments));
    OK(headwise_layout_total_rows(layout, &total_rows));
    OK(headwise_layout_rows_in_use(layout, &in_use));
    OK(headwise_layout_device_table_len(layout, &table_len));
    CHECK(batch == 1 && kv_heads == 2 && segments == 2);
    CHECK(total_rows == 22 && in_use == 4);
    CHECK(table_len == HEADWISE_DEVICE_TABLE_FIELDS * 2);

    /* offset, capacity, len, sink, ring_head, mode; num_segments entries each. */
    int32_t table[12];
    const int32_t want_table[12] = {0, 10, 10, 12, 4, 0, 0, 4, 0, 0, HEADWISE_MODE_FULL, HEADWISE_MODE_STREAMING};
    OK(headwise_layout_device_table(layout, table, 12));
    CHECK(memcmp(table, want_table, sizeof table) == 0);
    INVALID(headwise_layout_device_table(layout, table, 11), "12");
    INVALID(headwise_layout_device_table(layout, NULL, 12), "out");

    uint32_t offset[2], capacity[2], len[2], ring_head[2] = {9, 9}, sink[2], window[2];
    int32_t mode[2];
    OK(headwise_layout_segments(layout, 2, offset, capacity, len, ring_head, mode, sink, window));
    CHECK(memcmp(offset, OFFSET, sizeof offset) == 0 && memcmp(capacity, CAPACITY, sizeof capacity) == 0);
    CHECK(memcmp(len, LEN, sizeof len) == 0 && memcmp(mode, MODE, sizeof mode) == 0);
    CHECK(memcmp(sink, SINK, sizeof sink) == 0 && memcmp(window, WINDOW, sizeof window) == 0);
    CHECK(ring_head[0] == 0 && ring_head[1] == 0);
    OK(headwise_layout_segments(layout, 2, NULL, NULL, len, NULL, NULL, NULL, NULL));
    INVALID(headwise_layout_segments(layout, 3, offset, NULL, NULL, NULL, NULL, NULL, NULL), "num_segments");
    OK(headwise_layout_check_appendable(layout));

    HeadwiseLayout *copy = NULL;
    OK(headwise_layout_clone(layout, &copy));
    uint64_t copy_rows = 0;
    OK(headwise_layout_total_rows(copy, &copy_rows));
    CHECK(copy_rows == 22);
    OK(headwise_layout_free(copy));

    /* Getters: NULL handle or NULL out-pointer. */
    INVALID(headwise_layout_batch(NULL, &batch), "layout");
    INVALID(headwise_layout_total_rows(layout, NULL), "out");
    INVALID(headwise_layout_num_segments(NULL, NULL), NULL);
    INVALID(headwise_layout_check_appendable(NULL), "layout");
    INVALID(headwise_layout_clone(NULL, &copy), "layout");
    CHECK(copy == NULL);

    OK(headwise_layout_free(layout));
    OK(headwise_layout_free(NULL));
}

static void test_full_segments_and_regrow(void) {
    /* Segment 0 is Full with len == capacity: the next append has nowhere to go. */
    const uint32_t len[2] = {10, 12};
    const uint32_t ring_head[2] = {0, 3};
    HeadwiseLayout *layout = NULL;
    OK(headwise_layout_create(1, 2, 22, 2, OFFSET, CAPACITY, len, ring_head, MODE, SINK, WINDOW, &layout));
    EXPECT(headwise_layout_check_appendable(layout), HEADWISE_ERROR_SEGMENT_FULL, "segment 0");

    HeadwiseLayout *grown = NULL;
    OK(headwise_layout_regrown(layout, 5, &grown));
    uint32_t offset[2], capacity[2], glen[2], gring[2];
    OK(headwise_layout_segments(grown, 2, offset, capacity, glen, gring, NULL, NULL, NULL));
    CHECK(offset[0] == 0 && capacity[0] == 15 && glen[0] == 10);
    CHECK(offset[1] == 15 && capacity[1] == 12 && glen[1] == 12 && gring[1] == 3);
    uint64_t rows = 0;
    OK(headwise_layout_total_rows(grown, &rows));
    CHECK(rows == 27);
    OK(headwise_layout_check_appendable(grown));
    INVALID(headwise_layout_regrown(layout, 0xFFFFFFFFu, &grown), "headroom");
    CHECK(grown == NULL);
    OK(headwise_layout_free(layout));
}

static void test_invalid_layouts(void) {
    HeadwiseLayout *layout = SENTINEL;
    const uint32_t overlap[2] = {0, 5};
    INVALID(headwise_layout_create(1, 2, 22, 2, overlap, CAPACITY, LEN, NULL, MODE, SINK, WINDOW, &layout),
            "overlap");
    CHECK(layout == NULL);

    const uint32_t too_long[2] = {11, 0};
    INVALID(headwise_layout_create(1, 2, 22, 2, OFFSET, CAPACITY, too_long, NULL, MODE, SINK, WINDOW, &layout),
            "segments[0].len");
    INVALID(headwise_layout_create(1, 2, 21, 2, OFFSET, CAPACITY, LEN, NULL, MODE, SINK, WINDOW, &layout),
            "total_rows");
    INVALID(headwise_layout_create(1, 2, (uint64_t)INT32_MAX + 1, 2, OFFSET, CAPACITY, LEN, NULL, MODE, SINK,
                                   WINDOW, &layout),
            "total_rows");
    const int32_t bad_mode[2] = {HEADWISE_MODE_FULL, 7};
    INVALID(headwise_layout_create(1, 2, 22, 2, OFFSET, CAPACITY, LEN, NULL, bad_mode, SINK, WINDOW, &layout),
            "mode[1]");
    const uint32_t zero_window[2] = {0, 0};
    const uint32_t sink12[2] = {0, 12};
    INVALID(headwise_layout_create(1, 2, 22, 2, OFFSET, CAPACITY, LEN, NULL, MODE, sink12, zero_window, &layout),
            "window");
    const uint32_t wrong_window[2] = {0, 9};
    INVALID(headwise_layout_create(1, 2, 22, 2, OFFSET, CAPACITY, LEN, NULL, MODE, SINK, wrong_window, &layout),
            "capacity");
    const uint32_t ring_before_full[2] = {0, 1};
    INVALID(headwise_layout_create(1, 2, 22, 2, OFFSET, CAPACITY, LEN, ring_before_full, MODE, SINK, WINDOW,
                                   &layout),
            "ring_head");

    /* Counts that disagree: 3 segments for batch 1 x 2 heads, batch 0. */
    const uint32_t three[3] = {0, 10, 22};
    const int32_t full3[3] = {HEADWISE_MODE_FULL, HEADWISE_MODE_FULL, HEADWISE_MODE_FULL};
    INVALID(headwise_layout_create(1, 2, 30, 3, three, three, three, NULL, full3, NULL, NULL, &layout),
            "segments");
    INVALID(headwise_layout_create(0, 2, 22, 2, OFFSET, CAPACITY, LEN, NULL, MODE, SINK, WINDOW, &layout), "batch");

    /* NULL arrays and out-pointers. */
    INVALID(headwise_layout_create(1, 2, 22, 2, NULL, CAPACITY, LEN, NULL, MODE, SINK, WINDOW, &layout), "offset");
    INVALID(headwise_layout_create(1, 2, 22, 2, OFFSET, CAPACITY, NULL, NULL, MODE, SINK, WINDOW, &layout), "len");
    INVALID(headwise_layout_create(1, 2, 22, 2, OFFSET, CAPACITY, LEN, NULL, NULL, SINK, WINDOW, &layout), "mode");
    INVALID(headwise_layout_create(1, 2, 22, 2, OFFSET, CAPACITY, LEN, NULL, MODE, NULL, WINDOW, &layout), "sink");
    INVALID(headwise_layout_create(1, 2, 22, 2, OFFSET, CAPACITY, LEN, NULL, MODE, SINK, NULL, &layout), "window");
    INVALID(headwise_layout_create(1, 2, 22, 2, OFFSET, CAPACITY, LEN, NULL, MODE, SINK, WINDOW, NULL), "out");
    CHECK(layout == NULL);

    /* Misaligned array: the library refuses it instead of reading through it. */
    uint32_t storage[3] = {0, 0, 10};
    const uint32_t *misaligned = (const uint32_t *)((const char *)storage + 1);
    INVALID(headwise_layout_create(1, 2, 22, 2, misaligned, CAPACITY, LEN, NULL, MODE, SINK, WINDOW, &layout),
            "aligned");
}

static void test_pack(void) {
    /* 2 sequences x 2 KV heads: heads 0 Full (100 and 50 prompt tokens), heads 1 RLKV streaming. */
    const int32_t mode[4] = {HEADWISE_MODE_FULL, HEADWISE_MODE_STREAMING, HEADWISE_MODE_FULL,
                             HEADWISE_MODE_STREAMING};
    const uint32_t len[4] = {100, 0, 50, 0};
    const uint32_t sink[4] = {0, HEADWISE_RLKV_SINK, 0, HEADWISE_RLKV_SINK};
    const uint32_t window[4] = {0, HEADWISE_RLKV_WINDOW, 0, HEADWISE_RLKV_WINDOW};
    HeadwiseLayout *layout = NULL;
    OK(headwise_layout_pack(2, 2, 16, mode, len, sink, window, &layout));
    uint32_t offset[4], capacity[4];
    OK(headwise_layout_segments(layout, 4, offset, capacity, NULL, NULL, NULL, NULL, NULL));
    CHECK(offset[0] == 0 && capacity[0] == 116);
    CHECK(offset[1] == 116 && capacity[1] == 80);
    CHECK(offset[2] == 196 && capacity[2] == 66);
    CHECK(offset[3] == 262 && capacity[3] == 80);
    uint64_t rows = 0, in_use = 0;
    OK(headwise_layout_total_rows(layout, &rows));
    OK(headwise_layout_rows_in_use(layout, &in_use));
    CHECK(rows == 342 && in_use == 150);
    OK(headwise_layout_free(layout));

    /* NULL mode: all Full; NULL len: all empty. */
    OK(headwise_layout_pack(1, 3, 8, NULL, NULL, NULL, NULL, &layout));
    OK(headwise_layout_total_rows(layout, &rows));
    CHECK(rows == 24);
    OK(headwise_layout_free(layout));

    const uint32_t streaming_len[4] = {100, 1, 50, 0};
    INVALID(headwise_layout_pack(2, 2, 16, mode, streaming_len, sink, window, &layout), "len[1]");
    INVALID(headwise_layout_pack(2, 2, 16, mode, len, NULL, window, &layout), "sink");
    const int32_t bad_mode[4] = {0, 0, 2, 0};
    INVALID(headwise_layout_pack(2, 2, 16, bad_mode, len, NULL, NULL, &layout), "mode[2]");
    INVALID(headwise_layout_pack(SIZE_MAX, 2, 16, NULL, NULL, NULL, NULL, &layout), "batch * kv_heads");
    CHECK(layout == NULL);
}

static void test_budget_policies(void) {
    /* PyramidKV, C = 128, W = 8, L = 32, long prompt: prefix budgets 234, 227, ..., 17, which
     * total 4016 (not 32 * 120: the authors' integer floors overshoot). */
    uint32_t b[32];
    OK(headwise_budget_pyramid(128, 8, 32, 100000, HEADWISE_PYRAMID_BETA_DEFAULT, b, 32));
    uint32_t total = 0;
    for (int l = 0; l < 32; l++) {
        total += b[l] - 8;
        if (l > 0) CHECK(b[l - 1] - b[l] == 7);
    }
    CHECK(b[0] == 242 && b[31] == 25);
    CHECK(total == 4016);
    /* A prompt shorter than the capacity is kept whole. */
    uint32_t short_prompt[4];
    OK(headwise_budget_pyramid(128, 8, 4, 100, 20, short_prompt, 4));
    for (int l = 0; l < 4; l++) CHECK(short_prompt[l] == 100);
    INVALID(headwise_budget_pyramid(128, 8, 32, 100000, 20, b, 31), "out_len");
    INVALID(headwise_budget_pyramid(128, 8, 1, 100000, 20, b, 1), "layers");
    INVALID(headwise_budget_pyramid(128, 8, 32, 100000, 0, b, 32), "beta");
    INVALID(headwise_budget_pyramid(128, 8, 32, 100000, 20, NULL, 32), "out");

    /* HeadKV, worked by hand: B = 6, floor(6 / 1.5) = 4, pool = 12, min = 2, s = 1/8, 3/8, 1/2:
     * 3.5 -> 4, 6.5 -> 6 (half to even), 8, plus the window 8. */
    const float importance[3] = {1.0f, 3.0f, 4.0f};
    uint32_t caps[3];
    OK(headwise_budget_headkv(importance, 3, 14, 8, HEADWISE_HEADKV_BETA_DEFAULT, HEADWISE_HEADKV_TEMP_DEFAULT,
                              HEADWISE_HEADKV_REPO, caps, 3));
    CHECK(caps[0] == 12 && caps[1] == 14 && caps[2] == 16);
    /* KVCache-Factory: B = base, no temp: B = 14, floor(14 / 1.5) = 9, pool = 27, min = 5. */
    OK(headwise_budget_headkv(importance, 3, 14, 8, 1.5f, 2.0f, HEADWISE_HEADKV_KVCACHE_FACTORY, caps, 3));
    CHECK(caps[0] == 16 && caps[1] == 23 && caps[2] == 26);
    INVALID(headwise_budget_headkv(importance, 3, 14, 8, 1.5f, 1.0f, 5, caps, 3), "variant");
    INVALID(headwise_budget_headkv(importance, 3, 14, 8, 1.5f, 1.0f, HEADWISE_HEADKV_REPO, caps, 2), "out_len");
    const float with_nan[2] = {1.0f, NAN};
    INVALID(headwise_budget_headkv(with_nan, 2, 14, 8, 1.5f, 1.0f, HEADWISE_HEADKV_REPO, caps, 2), "importance[1]");
    INVALID(headwise_budget_headkv(NULL, 3, 14, 8, 1.5f, 1.0f, HEADWISE_HEADKV_REPO, caps, 3), "importance");
    INVALID(headwise_budget_headkv(importance, 3, 14, 8, 0.5f, 1.0f, HEADWISE_HEADKV_REPO, caps, 3), "beta");

    uint32_t u = 0;
    OK(headwise_budget_uniform(2048, 32, &u));
    CHECK(u == 2048);
    INVALID(headwise_budget_uniform(2048, 32, NULL), "out");
}

static void test_head_gates(void) {
    /* 2 layers x 2 KV heads; -0.5 and 1.5 are clipped to [0, 1] as the authors' loaders do. */
    const char tsv[] = "0.9\t0.1\n0.5\t0.3\n";
    HeadwiseHeadGates *gates = NULL;
    OK(headwise_head_gates_parse(tsv, strlen(tsv), &gates));
    size_t layers = 0, kv_heads = 0;
    OK(headwise_head_gates_shape(gates, &layers, &kv_heads));
    CHECK(layers == 2 && kv_heads == 2);
    double values[4];
    OK(headwise_head_gates_values(gates, values, 4));
    CHECK(values[0] == 0.9 && values[1] == 0.1 && values[2] == 0.5 && values[3] == 0.3);

    /* np.quantile([0.1, 0.3, 0.5, 0.9], 0.5) = 0.4: heads with gate >= 0.4 keep a full cache. */
    uint8_t mask[4];
    OK(headwise_head_gates_select_full(gates, 0.5, mask, 4));
    CHECK(mask[0] == 1 && mask[1] == 0 && mask[2] == 1 && mask[3] == 0);
    OK(headwise_head_gates_select_full(gates, 0.0, mask, 4));
    CHECK(mask[0] && mask[1] && mask[2] && mask[3]);
    OK(headwise_head_gates_select_full(gates, 1.0, mask, 4));
    CHECK(mask[0] == 1 && !mask[1] && !mask[2] && !mask[3]);
    INVALID(headwise_head_gates_select_full(gates, 1.5, mask, 4), "sparsity");
    INVALID(headwise_head_gates_select_full(gates, 0.5, mask, 3), "mask_len");
    INVALID(headwise_head_gates_select_full(gates, 0.5, NULL, 4), "mask");
    INVALID(headwise_head_gates_values(gates, values, 5), "len");
    INVALID(headwise_head_gates_shape(NULL, &layers, &kv_heads), "gates");
    OK(headwise_head_gates_free(gates));

    const char clipped[] = "-0.5 1.5\n";
    OK(headwise_head_gates_parse(clipped, strlen(clipped), &gates));
    OK(headwise_head_gates_values(gates, values, 2));
    CHECK(values[0] == 0.0 && values[1] == 1.0);
    OK(headwise_head_gates_free(gates));

    gates = SENTINEL;
    const char not_a_number[] = "0.1\tx\n";
    INVALID(headwise_head_gates_parse(not_a_number, strlen(not_a_number), &gates), "line 1 column 2");
    CHECK(gates == NULL);
    const char ragged[] = "0.1\t0.2\n0.3\n";
    INVALID(headwise_head_gates_parse(ragged, strlen(ragged), &gates), "line 2");
    INVALID(headwise_head_gates_parse("", 0, &gates), "no rows");
    const char not_utf8[] = "0.1\t\xff\n";
    INVALID(headwise_head_gates_parse(not_utf8, strlen(not_utf8), &gates), "UTF-8");
    INVALID(headwise_head_gates_parse(NULL, 5, &gates), "text");
    OK(headwise_head_gates_free(NULL));

    /* DuoAttention config.json: deploy sizes override the training ones. */
    uint32_t sink = 0, window = 0;
    const char config[] = "{\"sink_size\": 128, \"recent_size\": 256, \"deploy_sink_size\": 64}";
    OK(headwise_duo_attention_config(config, strlen(config), &sink, &window));
    CHECK(sink == 64 && window == 256);
    const char missing[] = "{\"sink_size\": 128}";
    INVALID(headwise_duo_attention_config(missing, strlen(missing), &sink, &window), "recent_size");
}

static void test_head_scores(void) {
    /* Keys in any order; a head's importance is the mean of its list. */
    const char json[] = "{\"0-0\":[1,3],\"0-1\":[2],\"1-1\":[0.5,0.5],\"1-0\":[4]}";
    HeadwiseHeadScores *scores = NULL;
    OK(headwise_head_scores_parse(json, strlen(json), &scores));
    size_t layers = 0, heads = 0;
    OK(headwise_head_scores_shape(scores, &layers, &heads));
    CHECK(layers == 2 && heads == 2);
    float importance[4];
    OK(headwise_head_scores_importance(scores, importance, 4));
    CHECK(importance[0] == 2.0f && importance[1] == 2.0f && importance[2] == 4.0f && importance[3] == 0.5f);
    INVALID(headwise_head_scores_importance(scores, importance, 3), "len");

    HeadwiseHeadScores *kv = NULL;
    OK(headwise_head_scores_to_kv_heads(scores, 1, &kv));
    float per_kv[2];
    OK(headwise_head_scores_importance(kv, per_kv, 2));
    CHECK(per_kv[0] == 2.0f && per_kv[1] == 2.25f);
    INVALID(headwise_head_scores_to_kv_heads(scores, 3, &kv), "kv_heads");
    CHECK(kv == NULL);

    /* The HeadKV pipeline from a score file: importances in, one budget per head out. */
    uint32_t caps[4];
    OK(headwise_budget_headkv(importance, 4, 128, 8, 1.5f, 1.0f, HEADWISE_HEADKV_REPO, caps, 4));
    CHECK(caps[2] > caps[0] && caps[0] > caps[3]);
    OK(headwise_head_scores_free(scores));

    scores = SENTINEL;
    const char *bad[] = {"", "[]", "{}", "{\"0-0\":[]}", "{\"0-0\":[1],\"0-1\":[2],\"1-0\":[3]}", "{\"a-0\":[1]}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        INVALID(headwise_head_scores_parse(bad[i], strlen(bad[i]), &scores), NULL);
        CHECK(scores == NULL);
    }
    OK(headwise_head_scores_free(NULL));
}

static void test_option_defaults(void) {
    HeadwiseSelectOptions select;
    OK(headwise_select_options_default(&select));
    CHECK(select.window == 32 && select.pool_kernel == 7 && select.pool == HEADWISE_POOL_MAX);
    CHECK(select.gqa == HEADWISE_GQA_MEAN && select.granularity == HEADWISE_GRANULARITY_KV_HEAD);
    CHECK(select.scale == 0.0f && select.chunk_tokens == 0);
    HeadwiseRkvOptions rkv;
    OK(headwise_rkv_options_default(256, &rkv));
    CHECK(rkv.budget == 256 && rkv.buffer == 128 && rkv.alpha == 8 && rkv.kernel == 7);
    CHECK(fabs(rkv.lambda - 0.07) < 1e-12 && rkv.fidelity_quirk == 0);
    INVALID(headwise_select_options_default(NULL), "out");
    INVALID(headwise_rkv_options_default(256, NULL), "out");
}

/* Checks every GPU entry point's argument handling. `gpu` is a live handle when a GPU is
 * present, else NULL. */
static void test_gpu_entry_points(HeadwiseStore *gpu) {
    HeadwiseLayout *layout = NULL;
    OK(headwise_layout_create(1, 2, 22, 2, OFFSET, CAPACITY, LEN, NULL, MODE, SINK, WINDOW, &layout));
    HeadwiseCache *cache = SENTINEL;
    HeadwiseQueryRing *ring = SENTINEL;
    HeadwiseRkvOptions rkv;
    OK(headwise_rkv_options_default(64, &rkv));
    HeadwisePrompt prompt = {NULL, NULL, NULL, 1, 2, 1, 64, NULL};
    uint32_t budgets[2] = {40, 40};
    char device_memory[16];

    if (gpu != NULL) {
        /* Checked before any device memory is touched. */
        INVALID(headwise_cache_create(gpu, layout, 9, 128, device_memory, device_memory, &cache), "dtype");
        INVALID(headwise_cache_create(gpu, layout, HEADWISE_DTYPE_BF16, 100, device_memory, device_memory, &cache),
                "head_dim");
        INVALID(headwise_cache_create(gpu, layout, HEADWISE_DTYPE_BF16, 128, NULL, device_memory, &cache), "k");
        INVALID(headwise_query_ring_create(gpu, HEADWISE_DTYPE_F16, 4, 17, 128, &ring), "alpha");
        OK(headwise_store_synchronize(gpu));
    }
    INVALID(headwise_cache_create(NULL, layout, HEADWISE_DTYPE_BF16, 128, device_memory, device_memory, &cache),
            "store");
    CHECK(cache == NULL);
    INVALID(headwise_cache_create(gpu, NULL, HEADWISE_DTYPE_BF16, 128, device_memory, device_memory, &cache),
            gpu ? "layout" : "store");
    INVALID(headwise_query_ring_create(NULL, HEADWISE_DTYPE_BF16, 4, 8, 128, &ring), "store");
    CHECK(ring == NULL);
    INVALID(headwise_store_synchronize(NULL), "store");
    HeadwiseLayout *snapshot = SENTINEL;
    INVALID(headwise_cache_layout(NULL, &snapshot), "cache");
    CHECK(snapshot == NULL);
    INVALID(headwise_cache_append(NULL, device_memory, device_memory), "cache");
    INVALID(headwise_cache_attention(NULL, device_memory, 4, device_memory, NULL, 0.0f, 0), "cache");
    INVALID(headwise_cache_compress_into(NULL, &prompt, NULL, budgets, 2), "cache");
    INVALID(headwise_cache_compress_into_adakv(NULL, &prompt, NULL, 40, 0.2f), "cache");
    INVALID(headwise_cache_relayout_into(NULL, NULL, device_memory, device_memory), "cache");
    INVALID(headwise_query_ring_push(NULL, device_memory), "ring");
    INVALID(headwise_cache_evict(NULL, NULL, 4, &rkv, NULL, 0, NULL, 0), "cache");
    OK(headwise_cache_free(NULL));
    OK(headwise_query_ring_free(NULL));
    OK(headwise_store_free(NULL));
    OK(headwise_layout_free(layout));
}

static void test_gpu(void) {
    int32_t built = -1;
    OK(headwise_gpu_kernels_built(&built));
    CHECK(built == 0 || built == 1);
    INVALID(headwise_gpu_kernels_built(NULL), "out");

    HeadwiseStore *gpu = SENTINEL;
    INVALID(headwise_gpu_create(-1, NULL, &gpu), "device");
    CHECK(gpu == NULL);
    INVALID(headwise_gpu_create(0, NULL, NULL), "out");

    gpu = SENTINEL;
    int code = headwise_gpu_create(0, NULL, &gpu);
    if (code == HEADWISE_OK) {
        printf("capi_test: a GPU is present; its kernels are checked by the gpu-tests suites\n");
        CHECK(gpu != NULL && gpu != SENTINEL);
        test_gpu_entry_points(gpu);
        OK(headwise_store_free(gpu));
        return;
    }
    /* No GPU here: the library says so (or that it has no kernels at all) and hands out nothing. */
    /* Without kernels: no nvcc at build time, or no `cuda` feature at all. */
    int absent = built ? HEADWISE_ERROR_NO_GPU
                       : code == HEADWISE_ERROR_FEATURE_OFF ? HEADWISE_ERROR_FEATURE_OFF : HEADWISE_ERROR_NO_KERNELS;
    EXPECT(code, absent, NULL);
    CHECK(gpu == NULL);
    printf("capi_test: no GPU: headwise_gpu_create -> %s (\"%s\")\n", headwise_status_name(code), message);
    /* A device that cannot exist fails the same way. */
    EXPECT(headwise_gpu_create(1000000, NULL, &gpu), absent,
           NULL);
    test_gpu_entry_points(NULL);
}

/* ---- The emulator store: every cache operation, results checked. ---- */

enum { D = 64, G = 2, KV = 2, Q_LEN = 48, WIN = 8, HEADS = KV * G };

static uint16_t bf16_of(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even (no NaN inputs here) */
    return (uint16_t)(u >> 16);
}

static float float_of(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static uint32_t rng_state = 12345u;
static float uniform(void) { /* in [-1, 1) */
    rng_state = rng_state * 1664525u + 1013904223u;
    return (float)(rng_state >> 8) / 8388608.0f - 1.0f;
}

static uint16_t *bf16_array(size_t n, int random) {
    /* 16-byte aligned like device memory; at least one element so the pointer is never NULL. */
    size_t bytes = ((n ? n : 1) * sizeof(uint16_t) + 15) / 16 * 16;
    uint16_t *p = aligned_alloc(16, bytes);
    for (size_t i = 0; i < n; i++) p[i] = random ? bf16_of(uniform()) : 0;
    return p;
}

typedef struct {
    uint32_t offset[KV], capacity[KV], len[KV], ring_head[KV];
    int32_t mode[KV];
} Segs;

static Segs segments_of(const HeadwiseCache *cache) {
    Segs s;
    HeadwiseLayout *l = NULL;
    OK(headwise_cache_layout(cache, &l));
    OK(headwise_layout_segments(l, KV, s.offset, s.capacity, s.len, s.ring_head, s.mode, NULL, NULL));
    OK(headwise_layout_free(l));
    return s;
}

/* The prompt position whose K row equals cache row `row` of head `h`, or -1. */
static int source_of(const uint16_t *cache_k, size_t row, const uint16_t *prompt_k, int h) {
    for (int t = 0; t < Q_LEN; t++) {
        if (memcmp(cache_k + row * D, prompt_k + ((size_t)h * Q_LEN + t) * D, D * sizeof(uint16_t)) == 0) return t;
    }
    return -1;
}

/* Decode attention of one query head over `n` rows from `first`, in float: out[D], returns lse. */
static float reference_attention(const uint16_t *k, const uint16_t *v, size_t first, uint32_t n, const uint16_t *q,
                                 float *out) {
    float scale = 1.0f / sqrtf((float)D), m = -INFINITY, sum = 0.0f;
    float *logit = malloc((n ? n : 1) * sizeof(float));
    for (uint32_t t = 0; t < n; t++) {
        float dot = 0.0f;
        for (int d = 0; d < D; d++) dot += float_of(q[d]) * float_of(k[(first + t) * D + d]);
        logit[t] = dot * scale;
        if (logit[t] > m) m = logit[t];
    }
    for (int d = 0; d < D; d++) out[d] = 0.0f;
    for (uint32_t t = 0; t < n; t++) {
        float p = expf(logit[t] - m);
        sum += p;
        for (int d = 0; d < D; d++) out[d] += p * float_of(v[(first + t) * D + d]);
    }
    for (int d = 0; d < D; d++) out[d] /= sum;
    free(logit);
    return m + logf(sum);
}

/* Expected Attention of one KV head h of the prompt (kvpress's definition, SPEC of scores.cu):
 * per query head g, mu . k / sqrt(D) + k^T cov k / (2 D) over the keys t >= sink, softmax, the
 * group mean, (a + eps) * ||v||; sinks +inf. out[Q_LEN - WIN]. cov may be NULL. */
static void reference_expected_attention(const uint16_t *pk, const uint16_t *pv, int h, const float *mean,
                                         const float *cov, uint32_t sink, float eps, float *out) {
    double a[Q_LEN] = {0};
    for (int g = 0; g < G; g++) {
        const float *mu = mean + ((size_t)h * G + g) * D;
        double logit[Q_LEN], m = -INFINITY, sum = 0;
        for (int t = (int)sink; t < Q_LEN; t++) {
            const uint16_t *kt = pk + ((size_t)h * Q_LEN + t) * D;
            double dot = 0, quad = 0;
            for (int i = 0; i < D; i++) {
                dot += (double)mu[i] * float_of(kt[i]);
                if (cov) {
                    double y = 0;
                    for (int j = 0; j < D; j++) y += (double)cov[(((size_t)h * G + g) * D + i) * D + j] * float_of(kt[j]);
                    quad += float_of(kt[i]) * y;
                }
            }
            logit[t] = dot / sqrt((double)D) + quad / (2.0 * D);
            if (logit[t] > m) m = logit[t];
        }
        for (int t = (int)sink; t < Q_LEN; t++) sum += exp(logit[t] - m);
        for (int t = (int)sink; t < Q_LEN; t++) a[t] += exp(logit[t] - m) / sum / G;
    }
    for (int t = 0; t < Q_LEN - WIN; t++) {
        const uint16_t *vt = pv + ((size_t)h * Q_LEN + t) * D;
        double vv = 0;
        for (int i = 0; i < D; i++) vv += (double)float_of(vt[i]) * float_of(vt[i]);
        out[t] = t < (int)sink ? INFINITY : (float)((a[t] + eps) * sqrt(vv));
    }
}

static void test_emulator(void) {
    HeadwiseStore *store = SENTINEL;
    INVALID(headwise_emulator_create(NULL), "out");
    OK(headwise_emulator_create(&store));
    CHECK(store != NULL && store != SENTINEL);

    /* Full segments sized for the budgets plus 16 rows of decode headroom. */
    const uint32_t budgets[KV] = {24, 16};
    HeadwiseLayout *layout = NULL;
    OK(headwise_layout_pack(1, KV, 16, NULL, budgets, NULL, NULL, &layout));
    uint64_t total_rows = 0;
    OK(headwise_layout_total_rows(layout, &total_rows));
    uint16_t *k = bf16_array(total_rows * D, 0), *v = bf16_array(total_rows * D, 0);
    uint16_t *pk = bf16_array((size_t)KV * Q_LEN * D, 1), *pv = bf16_array((size_t)KV * Q_LEN * D, 1);
    uint16_t *pq = bf16_array((size_t)HEADS * WIN * D, 1);

    HeadwiseCache *cache = SENTINEL;
    INVALID(headwise_cache_create(store, layout, HEADWISE_DTYPE_BF16, D, (char *)k + 1, v, &cache), "k");
    CHECK(cache == NULL);
    OK(headwise_cache_create(store, layout, HEADWISE_DTYPE_BF16, D, k, v, &cache));

    /* Prefill compression: each head keeps its budget, window included, in prompt order. */
    HeadwiseSelectOptions opts;
    OK(headwise_select_options_default(&opts));
    opts.window = WIN;
    HeadwisePrompt prompt = {pk, pv, pq, 1, KV, G, Q_LEN, NULL};
    INVALID(headwise_cache_compress_into(cache, &prompt, &opts, budgets, 1), "budgets");
    OK(headwise_cache_compress_into(cache, &prompt, &opts, budgets, KV));
    Segs s = segments_of(cache);
    for (int h = 0; h < KV; h++) {
        CHECK(s.len[h] == budgets[h]);
        int previous = -1, in_order = 1, found = 1;
        for (uint32_t i = 0; i < s.len[h]; i++) {
            int t = source_of(k, s.offset[h] + i, pk, h);
            found &= t >= 0;
            in_order &= t > previous;
            previous = t;
            /* V moved with K. */
            if (t >= 0)
                CHECK(memcmp(v + (s.offset[h] + i) * D, pv + ((size_t)h * Q_LEN + t) * D, D * sizeof(uint16_t)) == 0);
        }
        CHECK(found && in_order);
        /* The observation window is always kept: the last WIN rows are the last WIN tokens. */
        for (int w = 0; w < WIN; w++) CHECK(source_of(k, s.offset[h] + s.len[h] - WIN + w, pk, h) == Q_LEN - WIN + w);
    }

    /* Decode steps: append, attention against the reference, queries into the ring. */
    HeadwiseQueryRing *ring = NULL;
    INVALID(headwise_query_ring_create(store, HEADWISE_DTYPE_BF16, HEADS, 17, D, &ring), "alpha");
    OK(headwise_query_ring_create(store, HEADWISE_DTYPE_BF16, HEADS, 8, D, &ring));
    uint16_t *nk = bf16_array((size_t)KV * D, 1), *nv = bf16_array((size_t)KV * D, 1);
    uint16_t *q = bf16_array((size_t)HEADS * D, 1), *out = bf16_array((size_t)HEADS * D, 0);
    float lse[HEADS];
    double worst = 0.0, worst_lse = 0.0;
    for (int step = 0; step < 10; step++) {
        for (int i = 0; i < KV * D; i++) nk[i] = bf16_of(uniform()), nv[i] = bf16_of(uniform());
        for (int i = 0; i < HEADS * D; i++) q[i] = bf16_of(uniform());
        OK(headwise_cache_append(cache, nk, nv));
        s = segments_of(cache);
        for (int h = 0; h < KV; h++)
            CHECK(memcmp(k + (s.offset[h] + s.len[h] - 1) * D, nk + (size_t)h * D, D * sizeof(uint16_t)) == 0);
        OK(headwise_cache_attention(cache, q, G, out, lse, 0.0f, 0));
        for (int head = 0; head < HEADS; head++) {
            int h = head / G;
            float want[D];
            float want_lse = reference_attention(k, v, s.offset[h], s.len[h], q + (size_t)head * D, want);
            for (int d = 0; d < D; d++) {
                double err = fabs((double)float_of(out[head * D + d]) - want[d]);
                if (err > worst) worst = err;
            }
            if (fabs((double)lse[head] - want_lse) > worst_lse) worst_lse = fabs((double)lse[head] - want_lse);
        }
        OK(headwise_query_ring_push(ring, q));
    }
    /* bf16 output: half an ulp of values below 1 is 2^-9; the reference rounds differently. */
    CHECK(worst < 1.0 / 128);
    CHECK(worst_lse < 1e-4);
    printf("capi_test: emulator decode attention vs the C reference: max |err| %.2e (out), %.2e (lse)\n", worst,
           worst_lse);

    /* R-KV eviction, forced on both heads: each keeps the budget, the newest alpha rows last. */
    HeadwiseRkvOptions rkv;
    OK(headwise_rkv_options_default(20, &rkv));
    Segs before = segments_of(cache);
    uint16_t *old_k = bf16_array(total_rows * D, 0);
    memcpy(old_k, k, total_rows * D * sizeof(uint16_t));
    const uint8_t forced[KV] = {1, 1};
    uint8_t compacted[KV] = {9, 9};
    INVALID(headwise_cache_evict(cache, ring, G, &rkv, forced, KV, compacted, 1), "compacted_len");
    OK(headwise_cache_evict(cache, ring, G, &rkv, forced, KV, compacted, KV));
    s = segments_of(cache);
    for (int h = 0; h < KV; h++) {
        CHECK(compacted[h] == 1 && s.len[h] == 20);
        /* Every kept row was a row of the segment before, in the same order. */
        uint32_t j = 0;
        for (uint32_t i = 0; i < s.len[h]; i++) {
            while (j < before.len[h] &&
                   memcmp(k + (s.offset[h] + i) * D, old_k + (before.offset[h] + j) * D, D * sizeof(uint16_t)) != 0)
                j++;
            CHECK(j < before.len[h]);
            j++;
        }
        for (uint32_t a = 0; a < rkv.alpha; a++)
            CHECK(memcmp(k + (s.offset[h] + s.len[h] - rkv.alpha + a) * D,
                         old_k + (before.offset[h] + before.len[h] - rkv.alpha + a) * D, D * sizeof(uint16_t)) == 0);
    }

    /* Relayout into larger buffers, then decode on a new cache over them. */
    HeadwiseLayout *now = NULL, *grown = NULL;
    OK(headwise_cache_layout(cache, &now));
    OK(headwise_layout_regrown(now, 32, &grown));
    uint64_t grown_rows = 0;
    OK(headwise_layout_total_rows(grown, &grown_rows));
    uint16_t *k2 = bf16_array(grown_rows * D, 0), *v2 = bf16_array(grown_rows * D, 0);
    OK(headwise_cache_relayout_into(cache, grown, k2, v2));
    HeadwiseCache *cache2 = NULL;
    OK(headwise_cache_create(store, grown, HEADWISE_DTYPE_BF16, D, k2, v2, &cache2));
    OK(headwise_cache_append(cache2, nk, nv));
    Segs g2 = segments_of(cache2);
    for (int h = 0; h < KV; h++) {
        CHECK(g2.len[h] == s.len[h] + 1);
        CHECK(memcmp(k2 + g2.offset[h] * D, k + s.offset[h] * D, s.len[h] * D * sizeof(uint16_t)) == 0);
    }

    /* A speculative step on the regrown cache: 3 drafts appended in one call (token-major
     * [1][3][KV][D]), verified by one chunk attention (chunk query i sees the rows up to its own
     * draft), 1 accepted, 2 rolled back. */
    {
        enum { DRAFTS = 3 };
        uint16_t *dk = bf16_array((size_t)DRAFTS * KV * D, 1), *dv = bf16_array((size_t)DRAFTS * KV * D, 1);
        uint16_t *dq = bf16_array((size_t)DRAFTS * HEADS * D, 1), *dout = bf16_array((size_t)DRAFTS * HEADS * D, 0);
        float dlse[DRAFTS * HEADS];
        INVALID(headwise_cache_append_tokens(NULL, dk, dv, DRAFTS), "cache");
        INVALID(headwise_cache_append_tokens(cache2, dk, dv, 0), "tokens");
        OK(headwise_cache_append_tokens(cache2, dk, dv, DRAFTS));
        Segs d2 = segments_of(cache2);
        for (int h = 0; h < KV; h++) {
            CHECK(d2.len[h] == g2.len[h] + DRAFTS);
            for (int t = 0; t < DRAFTS; t++)
                CHECK(memcmp(k2 + (d2.offset[h] + g2.len[h] + t) * D, dk + ((size_t)t * KV + h) * D,
                             D * sizeof(uint16_t)) == 0);
        }
        INVALID(headwise_cache_attention_chunk(cache2, dq, 0, G, dout, dlse, 0.0f, 0), "q_len");
        INVALID(headwise_cache_attention_chunk(cache2, dq, 65, G, dout, dlse, 0.0f, 0), "q_len");
        INVALID(headwise_cache_attention_chunk(NULL, dq, DRAFTS, G, dout, dlse, 0.0f, 0), "cache");
        OK(headwise_cache_attention_chunk(cache2, dq, DRAFTS, G, dout, dlse, 0.0f, 0));
        double chunk_worst = 0.0, chunk_worst_lse = 0.0;
        for (int t = 0; t < DRAFTS; t++) {
            for (int head = 0; head < HEADS; head++) {
                int h = head / G;
                size_t row = (size_t)t * HEADS + head;
                float want[D];
                float want_lse = reference_attention(k2, v2, d2.offset[h], d2.len[h] - DRAFTS + t + 1, dq + row * D, want);
                for (int d = 0; d < D; d++) {
                    double err = fabs((double)float_of(dout[row * D + d]) - want[d]);
                    if (err > chunk_worst) chunk_worst = err;
                }
                if (fabs((double)dlse[row] - want_lse) > chunk_worst_lse) chunk_worst_lse = fabs((double)dlse[row] - want_lse);
            }
        }
        CHECK(chunk_worst < 1.0 / 128);
        CHECK(chunk_worst_lse < 1e-4);
        printf("capi_test: emulator chunk attention (3 drafts) vs the C reference: max |err| %.2e (out), %.2e (lse)\n",
               chunk_worst, chunk_worst_lse);
        const uint32_t reject[1] = {DRAFTS - 1}, too_many[1] = {100000}, two[2] = {1, 1};
        INVALID(headwise_cache_rollback(cache2, two, 2), "tokens");
        INVALID(headwise_cache_rollback(cache2, too_many, 1), "tokens[0]");
        INVALID(headwise_cache_rollback(cache2, NULL, 1), "tokens");
        INVALID(headwise_cache_rollback(NULL, reject, 1), "cache");
        OK(headwise_cache_rollback(cache2, reject, 1));
        Segs r2 = segments_of(cache2);
        for (int h = 0; h < KV; h++) CHECK(r2.len[h] == g2.len[h] + 1);
        free(dk);
        free(dv);
        free(dq);
        free(dout);
    }

    /* AdaKV: budgets allocated from the scores, on a fresh cache of the same layout. */
    HeadwiseCache *ada = NULL;
    uint16_t *k3 = bf16_array(total_rows * D, 0), *v3 = bf16_array(total_rows * D, 0);
    OK(headwise_cache_create(store, layout, HEADWISE_DTYPE_BF16, D, k3, v3, &ada));
    OK(headwise_cache_compress_into_adakv(ada, &prompt, &opts, 16, 0.2f));
    s = segments_of(ada);
    /* Bp = 16 - WIN = 8 per head: the top 2 * 8 scores are counted per head (c0 + c1 = 16),
     * each keeps round(0.8 * c + floor(0.2 * 8)) = round(0.8 * c) + 1 beyond its window, so the
     * total is 16 + 2 + 12.8 rounded per head: 30..32, and every head keeps at least WIN + 1. */
    CHECK(s.len[0] + s.len[1] >= 30 && s.len[0] + s.len[1] <= 32);
    CHECK(s.len[0] >= WIN + 1 && s.len[1] >= WIN + 1);

    /* Given scores (here the position: later is better) and KNorm, on fresh caches. */
    HeadwiseCache *scored = NULL, *knorm = NULL;
    uint16_t *k4 = bf16_array(total_rows * D, 0), *v4 = bf16_array(total_rows * D, 0);
    uint16_t *k5 = bf16_array(total_rows * D, 0), *v5 = bf16_array(total_rows * D, 0);
    OK(headwise_cache_create(store, layout, HEADWISE_DTYPE_BF16, D, k4, v4, &scored));
    OK(headwise_cache_create(store, layout, HEADWISE_DTYPE_BF16, D, k5, v5, &knorm));
    float prefix_scores[KV * (Q_LEN - WIN)];
    for (int i = 0; i < KV * (Q_LEN - WIN); i++) prefix_scores[i] = (float)(i % (Q_LEN - WIN));
    HeadwisePrompt no_queries = {pk, pv, NULL, 1, KV, G, Q_LEN, NULL};
    HeadwiseSelectOptions unpooled = opts;
    unpooled.pool_kernel = 1;
    INVALID(headwise_cache_compress_into_scored(scored, &no_queries, &unpooled, prefix_scores, 3, budgets, KV), "scores");
    OK(headwise_cache_compress_into_scored(scored, &no_queries, &unpooled, prefix_scores, KV * (Q_LEN - WIN), budgets,
                                           KV));
    s = segments_of(scored);
    for (int h = 0; h < KV; h++) {
        CHECK(s.len[h] == budgets[h]);
        /* The best prefix tokens are the latest: the kept rows are the last `budget` tokens. */
        for (uint32_t i = 0; i < s.len[h]; i++)
            CHECK(source_of(k4, s.offset[h] + i, pk, h) == (int)(Q_LEN - budgets[h] + i));
    }
    HeadwiseSelectOptions by_norm = opts;
    by_norm.score = 7;
    INVALID(headwise_cache_compress_into(knorm, &no_queries, &by_norm, budgets, KV), "opts.score");
    by_norm.score = HEADWISE_SCORE_KNORM;
    OK(headwise_cache_compress_into(knorm, &no_queries, &by_norm, budgets, KV));
    s = segments_of(knorm);
    CHECK(s.len[0] == budgets[0] && s.len[1] == budgets[1]);

    /* Sinks and threshold keep (KNorm scores): +inf keeps the sinks and the window only; -inf
     * keeps every prefix token, more than the segments hold (refused before the gather). */
    {
        HeadwiseCache *th = NULL;
        uint16_t *k10 = bf16_array(total_rows * D, 0), *v10 = bf16_array(total_rows * D, 0);
        OK(headwise_cache_create(store, layout, HEADWISE_DTYPE_BF16, D, k10, v10, &th));
        HeadwiseSelectOptions sinks = opts;
        sinks.score = HEADWISE_SCORE_KNORM;
        sinks.sink = 2;
        INVALID(headwise_cache_compress_into_threshold(th, &no_queries, &sinks, NAN), "budgets.threshold");
        INVALID(headwise_cache_compress_into_threshold(th, &no_queries, &sinks, -INFINITY), "capacity");
        OK(headwise_cache_compress_into_threshold(th, &no_queries, &sinks, INFINITY));
        Segs t = segments_of(th);
        for (int h = 0; h < KV; h++) {
            CHECK(t.len[h] == WIN + 2);
            for (uint32_t i = 0; i < t.len[h]; i++)
                CHECK(source_of(k10, t.offset[h] + i, pk, h) == (int)(i < 2 ? i : Q_LEN - WIN + (i - 2)));
        }
        sinks.sink = Q_LEN + 1;
        INVALID(headwise_cache_compress_into_threshold(th, &no_queries, &sinks, 0.0f), "sink");
        OK(headwise_cache_free(th));
        free(k10), free(v10);
    }

    /* The packed (token-major, cu_seqlens) form of the same prompt: K/V [Q_LEN][KV][D], every
     * token's queries [Q_LEN][HEADS][D] (the window's are pq); the selection and the kept rows
     * must be the head-major call's. */
    {
        uint16_t *tk = bf16_array((size_t)Q_LEN * KV * D, 0), *tv = bf16_array((size_t)Q_LEN * KV * D, 0);
        uint16_t *tq = bf16_array((size_t)Q_LEN * HEADS * D, 1);
        for (int t = 0; t < Q_LEN; t++)
            for (int h = 0; h < KV; h++) {
                memcpy(tk + ((size_t)t * KV + h) * D, pk + ((size_t)h * Q_LEN + t) * D, D * sizeof(uint16_t));
                memcpy(tv + ((size_t)t * KV + h) * D, pv + ((size_t)h * Q_LEN + t) * D, D * sizeof(uint16_t));
            }
        for (int i = 0; i < WIN; i++)
            for (int qh = 0; qh < HEADS; qh++)
                memcpy(tq + ((size_t)(Q_LEN - WIN + i) * HEADS + qh) * D, pq + ((size_t)qh * WIN + i) * D,
                       D * sizeof(uint16_t));
        const uint32_t cu[2] = {0, Q_LEN}, cu_bad[2] = {1, Q_LEN + 1};
        HeadwisePrompt packed = {tk, tv, tq, 1, KV, G, Q_LEN, cu};
        HeadwisePrompt bad_first = {tk, tv, tq, 1, KV, G, Q_LEN, cu_bad};
        HeadwisePrompt bad_longest = {tk, tv, tq, 1, KV, G, Q_LEN - 1, cu};
        HeadwiseCache *hm = NULL, *tm = NULL;
        uint16_t *k7 = bf16_array(total_rows * D, 0), *v7 = bf16_array(total_rows * D, 0);
        uint16_t *k8 = bf16_array(total_rows * D, 0), *v8 = bf16_array(total_rows * D, 0);
        OK(headwise_cache_create(store, layout, HEADWISE_DTYPE_BF16, D, k7, v7, &hm));
        OK(headwise_cache_create(store, layout, HEADWISE_DTYPE_BF16, D, k8, v8, &tm));
        INVALID(headwise_cache_compress_into(tm, &bad_first, &opts, budgets, KV), "cu_seqlens[0]");
        INVALID(headwise_cache_compress_into(tm, &bad_longest, &opts, budgets, KV), "q_len");
        OK(headwise_cache_compress_into(hm, &prompt, &opts, budgets, KV));
        OK(headwise_cache_compress_into(tm, &packed, &opts, budgets, KV));
        OK(headwise_store_synchronize(store));
        Segs a = segments_of(hm), b = segments_of(tm);
        for (int h = 0; h < KV; h++) {
            CHECK(a.len[h] == budgets[h] && b.len[h] == a.len[h]);
            CHECK(memcmp(k7 + a.offset[h] * D, k8 + b.offset[h] * D, a.len[h] * D * sizeof(uint16_t)) == 0);
            CHECK(memcmp(v7 + a.offset[h] * D, v8 + b.offset[h] * D, a.len[h] * D * sizeof(uint16_t)) == 0);
        }
        OK(headwise_cache_free(hm));
        OK(headwise_cache_free(tm));
        free(k7), free(v7), free(k8), free(v8), free(tk), free(tv), free(tq);
    }

    /* H2O: attention that accumulates each token's mass (per head, probabilities sum to 1, so a
     * segment's mass sums to G), then eviction by it to 12 tokens with the 4 newest kept: the
     * kept older tokens are the 8 of highest mass (ties to the lower position), in order, with
     * their K rows and mass moved, the freed rows' mass zeroed. */
    {
        HeadwiseCache *hh = NULL;
        uint16_t *k9 = bf16_array(total_rows * D, 0), *v9 = bf16_array(total_rows * D, 0);
        OK(headwise_cache_create(store, layout, HEADWISE_DTYPE_BF16, D, k9, v9, &hh));
        OK(headwise_cache_compress_into(hh, &prompt, &opts, budgets, KV));
        float *mass = calloc(total_rows, sizeof(float));
        uint16_t *q1 = bf16_array((size_t)HEADS * D, 1), *o1 = bf16_array((size_t)HEADS * D, 0);
        INVALID(headwise_cache_attention_with_mass(hh, q1, G, o1, NULL, 0.0f, 0, mass, total_rows - 1), "mass");
        OK(headwise_cache_attention_with_mass(hh, q1, G, o1, NULL, 0.0f, 0, mass, total_rows));
        OK(headwise_store_synchronize(store));
        Segs before = segments_of(hh);
        float *old_mass = malloc(total_rows * sizeof(float));
        memcpy(old_mass, mass, total_rows * sizeof(float));
        uint16_t *old_k = malloc(total_rows * D * sizeof(uint16_t));
        memcpy(old_k, k9, total_rows * D * sizeof(uint16_t));
        for (int h = 0; h < KV; h++) {
            double sum = 0;
            for (uint32_t i = 0; i < before.len[h]; i++) sum += mass[before.offset[h] + i];
            CHECK(fabs(sum - G) <= 1e-4 * G);
        }
        uint8_t done[KV] = {9, 9};
        INVALID(headwise_cache_evict_by_mass(hh, mass, total_rows, 12, 13, done, KV), "recent");
        INVALID(headwise_cache_evict_by_mass(hh, mass, total_rows, 12, 4, done, KV + 1), "compacted_len");
        OK(headwise_cache_evict_by_mass(hh, mass, total_rows, 12, 4, done, KV));
        Segs after = segments_of(hh);
        for (int h = 0; h < KV; h++) {
            CHECK(done[h] == 1 && after.len[h] == 12);
            const uint32_t off = before.offset[h], n = before.len[h] - 4;
            uint32_t kept = 0;
            for (uint32_t i = 0; i < n; i++) {
                uint32_t rank = 0;
                for (uint32_t j = 0; j < n; j++)
                    rank += old_mass[off + j] > old_mass[off + i] || (old_mass[off + j] == old_mass[off + i] && j < i);
                if (rank >= 8) continue;
                CHECK(mass[off + kept] == old_mass[off + i]);
                CHECK(memcmp(k9 + (size_t)(off + kept) * D, old_k + (size_t)(off + i) * D, D * sizeof(uint16_t)) == 0);
                kept++;
            }
            CHECK(kept == 8);
            for (uint32_t i = 0; i < 4; i++) CHECK(mass[off + 8 + i] == old_mass[off + n + i]);
            for (uint32_t i = 12; i < before.len[h]; i++) CHECK(mass[off + i] == 0.0f);
        }
        OK(headwise_cache_free(hh));
        free(k9), free(v9), free(mass), free(old_mass), free(old_k), free(q1), free(o1);
    }

    /* Expected Attention scores (random mean, a small diagonal-plus-noise covariance) vs the C
     * reference above, then selection on them keeps each head's sinks. */
    enum { N = Q_LEN - WIN };
    float *mean = malloc(sizeof(float) * HEADS * D), *cov = malloc(sizeof(float) * HEADS * D * D);
    for (int i = 0; i < HEADS * D; i++) mean[i] = 4.0f * uniform();
    for (int i = 0; i < HEADS * D * D; i++) cov[i] = (i / D) % D == i % D ? 1.0f + uniform() : 0.05f * uniform();
    HeadwiseExpectedAttentionOptions ea;
    OK(headwise_expected_attention_options_default(&ea));
    CHECK(ea.sink == 4 && ea.use_vnorm == 1 && ea.epsilon == 0.02f);
    float ea_scores[KV * N], want[N];
    INVALID(headwise_cache_expected_attention_scores(scored, &no_queries, mean, HEADS * D, cov, 5, WIN, &ea, ea_scores,
                                                     KV * N),
            "cov");
    INVALID(headwise_cache_expected_attention_scores(scored, &no_queries, mean, HEADS * D, NULL, 0, WIN, &ea, ea_scores,
                                                     KV * N - 1),
            "scores");
    for (int with_cov = 0; with_cov < 2; with_cov++) {
        OK(headwise_cache_expected_attention_scores(scored, &no_queries, mean, HEADS * D, with_cov ? cov : NULL,
                                                    with_cov ? (size_t)HEADS * D * D : 0, WIN, &ea, ea_scores, KV * N));
        OK(headwise_store_synchronize(store));
        for (int h = 0; h < KV; h++) {
            reference_expected_attention(pk, pv, h, mean, with_cov ? cov : NULL, ea.sink, ea.epsilon, want);
            for (int t = 0; t < N; t++) {
                float got = ea_scores[h * N + t];
                if (t < (int)ea.sink)
                    CHECK(isinf(got) && got > 0);
                else
                    CHECK(fabsf(got - want[t]) <= 1e-4f * fabsf(want[t]));
            }
        }
    }
    HeadwiseCache *by_ea = NULL;
    uint16_t *k6 = bf16_array(total_rows * D, 0), *v6 = bf16_array(total_rows * D, 0);
    OK(headwise_cache_create(store, layout, HEADWISE_DTYPE_BF16, D, k6, v6, &by_ea));
    OK(headwise_cache_compress_into_scored(by_ea, &no_queries, &unpooled, ea_scores, KV * N, budgets, KV));
    s = segments_of(by_ea);
    for (int h = 0; h < KV; h++) {
        CHECK(s.len[h] == budgets[h]);
        for (uint32_t i = 0; i < ea.sink; i++) CHECK(source_of(k6, s.offset[h] + i, pk, h) == (int)i);
    }
    OK(headwise_cache_free(by_ea));
    free(k6), free(v6), free(mean), free(cov);

    OK(headwise_cache_free(scored));
    OK(headwise_cache_free(knorm));
    free(k4), free(v4), free(k5), free(v5);

    /* A ring of the other dtype cannot drive this cache. */
    HeadwiseQueryRing *f16_ring = NULL;
    OK(headwise_query_ring_create(store, HEADWISE_DTYPE_F16, HEADS, 8, D, &f16_ring));
    INVALID(headwise_cache_evict(cache, f16_ring, G, &rkv, forced, KV, NULL, 0), "ring");

    OK(headwise_store_synchronize(store));
    OK(headwise_query_ring_free(f16_ring));
    OK(headwise_cache_free(ada));
    OK(headwise_cache_free(cache2));
    OK(headwise_cache_free(cache));
    OK(headwise_query_ring_free(ring));
    OK(headwise_layout_free(grown));
    OK(headwise_layout_free(now));
    OK(headwise_layout_free(layout));
    OK(headwise_store_free(store));
    uint16_t *buffers[] = {k, v, pk, pv, pq, nk, nv, q, out, old_k, k2, v2, k3, v3};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) free(buffers[i]);
}

int main(void) {
    test_status_codes_and_messages();
    test_layout_queries();
    test_full_segments_and_regrow();
    test_invalid_layouts();
    test_pack();
    test_budget_policies();
    test_head_gates();
    test_head_scores();
    test_option_defaults();
    test_gpu();
    test_emulator();
    printf("capi_test: %d passed, %d failed\n", checks - failures, failures);
    return failures == 0 ? 0 : 1;
}
