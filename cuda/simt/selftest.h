/* The emulator's self-test kernels (selftest.cu) and their host driver (selftest_driver.cpp).
 *
 * One list of kernels serves both: selftest.cu stamps out an entry point per line, the driver
 * declares the matching hw_emu_<name> functions. Every kernel takes the same parameter struct
 * and uses the fields it needs. */
#ifndef HEADWISE_SIMT_SELFTEST_H
#define HEADWISE_SIMT_SELFTEST_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct HwSimtTestParams {
    int32_t* out;            /* integer results */
    float* out_f;            /* float results */
    uint32_t* out_bits;      /* raw bit patterns (conversions) */
    const float* in_f;       /* float inputs */
    const void* in_a;        /* WMMA A tile, or 16-bit patterns to widen */
    const void* in_b;        /* WMMA B tile, or 16-bit patterns to widen */
    int32_t n;               /* element count, where a kernel needs one */
} HwSimtTestParams;

#ifdef __cplusplus
}
#endif

/* X(entry name, device function run by every thread, __launch_bounds__) */
#define HW_SIMT_SELFTEST_KERNELS(X)                                  \
    X(simt_test_shuffles, test_shuffles, 1024)                       \
    X(simt_test_votes, test_votes, 1024)                             \
    X(simt_test_disjoint_masks, test_disjoint_masks, 1024)           \
    X(simt_test_block_reductions, test_block_reductions, 1024)       \
    X(simt_test_big_block, test_big_block, 1024)                     \
    X(simt_test_atomics, test_atomics, 1024)                         \
    X(simt_test_dynamic_shared, test_dynamic_shared, 1024)           \
    X(simt_test_static_shared, test_static_shared, 1024)             \
    X(simt_test_wmma_f16, test_wmma_f16, 1024)                       \
    X(simt_test_wmma_bf16, test_wmma_bf16, 1024)                     \
    X(simt_test_vector_types, test_vector_types, 1024)               \
    X(simt_test_conversions, test_conversions, 1024)                 \
    X(simt_test_bounded, test_vector_types, 64)                      \
    X(simt_test_race, test_race, 1024)                               \
    X(simt_planted_early_return, planted_early_return, 1024)         \
    X(simt_planted_divergent_barrier, planted_divergent_barrier, 1024) \
    X(simt_planted_lane_exited, planted_lane_exited, 1024)           \
    X(simt_planted_lane_elsewhere, planted_lane_elsewhere, 1024)     \
    X(simt_planted_mask_without_self, planted_mask_without_self, 1024) \
    X(simt_planted_mismatched_collectives, planted_mismatched_collectives, 1024) \
    X(simt_planted_cyclic_wait, planted_cyclic_wait, 1024) \
    X(simt_planted_deadlock, planted_deadlock, 1024)                 \
    X(simt_planted_wmma_misaligned, planted_wmma_misaligned, 1024)   \
    X(simt_planted_shared_overrun, planted_shared_overrun, 1024)

#endif /* HEADWISE_SIMT_SELFTEST_H */
