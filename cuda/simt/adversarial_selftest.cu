// Planted bugs for the adversarial modes (adversarial.h): each kernel is wrong on a GPU, yet
// passes the default emulator; only its mode shows the bug. Driven by adversarial_selftest.cpp.
// Non-template functions, so that the poison mode reaches their static __shared__ variables.
#include "compat.cuh"
#include "simt/selftest.h"

// wmma, 32 threads: reads an accumulator as if x[i] were tile element i (row-major).
__device__ void planted_wmma_layout(const HwSimtTestParams& p) {
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c;
    nvcuda::wmma::load_matrix_sync(c, p.in_f, 16, nvcuda::wmma::mem_row_major);
    for (int i = 0; i < c.num_elements; ++i) c.x[i] *= 2.0f;  // elementwise: valid anywhere
    if (threadIdx.x == 0) {
        for (int i = 0; i < 256; ++i) p.out_f[i] = c.x[i];  // @planted:wmma-layout
    }
}

// masks, 32 threads: the upper half exits, the lower half still names it in a full mask.
__device__ void planted_mask_exited(const HwSimtTestParams& p) {
    if (threadIdx.x >= 16) return;
    p.out[threadIdx.x] = static_cast<int>(__ballot_sync(0xffffffffu, 1));  // @planted:mask-exited
}

// its, 32 threads: lanes read a neighbour's shared-memory slot without __syncwarp in between,
// which only the lockstep (or lane-ordered) execution of pre-Volta GPUs makes right.
__device__ void planted_missing_syncwarp(const HwSimtTestParams& p) {
    __shared__ int stage[32];
    const int lane = static_cast<int>(threadIdx.x);
    stage[lane] = lane + 1;
    p.out[lane] = stage[lane > 0 ? lane - 1 : 0];  // @planted:missing-syncwarp
    __syncthreads();
    stage[lane] = -1;  // no stale right answers for the next launch
}

// poison, 32 threads: counts on shared memory being zero at block start.
__device__ void planted_uninitialized_shared(const HwSimtTestParams& p) {
    __shared__ int count[32];
    const int lane = static_cast<int>(threadIdx.x);
    count[lane] += 1;  // @planted:uninitialized-shared
    p.out[lane] = count[lane];
    count[lane] = 0;  // what the next launch (wrongly) expects
}

// smem_optin: any number of threads, 64 KiB of dynamic shared memory.
__device__ void big_dynamic_shared(const HwSimtTestParams& p) {
    HW_DYNAMIC_SHARED(int, buffer);
    buffer[16 * 1024 - 1 - threadIdx.x] = static_cast<int>(threadIdx.x);
    __syncthreads();
    p.out[threadIdx.x] = buffer[16 * 1024 - 1 - threadIdx.x];
}

#define HW_SIMT_ADVERSARIAL_KERNELS(X)                                  \
    X(simt_planted_wmma_layout, planted_wmma_layout, 1024)              \
    X(simt_planted_mask_exited, planted_mask_exited, 1024)              \
    X(simt_planted_missing_syncwarp, planted_missing_syncwarp, 1024)    \
    X(simt_planted_uninitialized_shared, planted_uninitialized_shared, 1024) \
    X(simt_planted_smem_no_optin, big_dynamic_shared, 1024)             \
    X(hw_simt_test_smem_optin, big_dynamic_shared, 1024)

#define X(name, body, max_threads) HW_KERNEL_ENTRY_BOUNDED(name, HwSimtTestParams, max_threads, body(p))
HW_SIMT_ADVERSARIAL_KERNELS(X)
#undef X
