// Self-test kernels of the CPU SIMT emulator, written as ordinary CUDA (they also compile with
// nvcc). selftest_driver.cpp launches them through the emulator and checks every result exactly.
//
// The second half plants bugs that the emulator must report. Each offending line carries an
// "@planted:<name>" marker; tests/simt.rs finds the marker and checks that the report names
// this file and that line.
#include "compat.cuh"
#include "simt/selftest.h"

constexpr unsigned kFull = 0xffffffffu;

// Layout facts kernels rely on; the same on the GPU.
static_assert(sizeof(float4) == 16 && alignof(float4) == 16, "float4");
static_assert(sizeof(float3) == 12 && alignof(float3) == 4, "float3");
static_assert(sizeof(float2) == 8 && alignof(float2) == 8, "float2");
static_assert(alignof(int2) == 8 && alignof(uint2) == 8, "int2/uint2");
static_assert(alignof(int4) == 16 && alignof(uint4) == 16, "int4/uint4");
static_assert(alignof(double2) == 16 && alignof(short4) == 8 && alignof(char4) == 4, "small vectors");
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half");
static_assert(sizeof(__half2) == 4 && alignof(__half2) == 4, "__half2");
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat162) == 4, "bf16");

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x % 32); }

__device__ __forceinline__ int linear_thread() {
    return static_cast<int>(threadIdx.x + threadIdx.y * blockDim.x +
                            threadIdx.z * blockDim.x * blockDim.y);
}

// ---- semantics ------------------------------------------------------------------------------

// 64 threads; 12 results per thread.
__device__ void test_shuffles(const HwSimtTestParams& p) {
    const int lane = lane_id();
    int* out = p.out + threadIdx.x * 12;
    out[0] = __shfl_sync(kFull, lane * 10, (lane + 3) % 32);
    out[1] = __shfl_sync(kFull, lane, 5, 8);
    out[2] = __shfl_sync(kFull, lane, lane + 35, 16);
    out[3] = __shfl_up_sync(kFull, lane, 3);
    out[4] = __shfl_up_sync(kFull, lane, 2, 8);
    out[5] = __shfl_down_sync(kFull, lane, 5);
    out[6] = __shfl_down_sync(kFull, lane, 3, 16);
    out[7] = __shfl_xor_sync(kFull, lane, 9);
    out[8] = __shfl_xor_sync(kFull, lane, 16, 16);
    const long long wide = __shfl_sync(kFull, (static_cast<long long>(lane) << 40) | 7, 31 - lane);
    out[9] = static_cast<int>(wide >> 40) * 100 + static_cast<int>(wide & 0xff);
    const __half h = __shfl_xor_sync(kFull, __float2half(static_cast<float>(lane) * 0.5f), 2);
    out[10] = static_cast<int>(__half2float(h) * 2.0f);
    float sum = static_cast<float>(lane);
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFull, sum, offset);
    out[11] = static_cast<int>(sum);
}

// 72 threads: two full warps and a partial one of 8 lanes; 12 results per thread.
__device__ void test_votes(const HwSimtTestParams& p) {
    const int lane = lane_id();
    const int warp = static_cast<int>(threadIdx.x / 32);
    int* out = p.out + threadIdx.x * 12;
    out[0] = out[1] = out[2] = -1;
    if (warp == 0) {  // the two half-warps vote separately
        if (lane < 16) {
            out[0] = static_cast<int>(__ballot_sync(0x0000ffffu, lane % 3 == 0));
            out[1] = __any_sync(0x0000ffffu, lane == 20);
            out[2] = __all_sync(0x0000ffffu, lane < 16);
        } else {
            out[0] = static_cast<int>(__ballot_sync(0xffff0000u, lane % 3 == 0));
            out[1] = __any_sync(0xffff0000u, lane == 20);
            out[2] = __all_sync(0xffff0000u, lane != 31);
        }
    }
    // A full mask over the partial warp: lanes that do not exist are not waited for.
    out[3] = static_cast<int>(__ballot_sync(kFull, 1));
    out[4] = static_cast<int>(__activemask());
    out[5] = static_cast<int>(__match_any_sync(kFull, lane / 4));
    out[6] = __reduce_add_sync(kFull, lane);
    out[7] = __reduce_min_sync(kFull, lane - 10);
    out[8] = static_cast<int>(__reduce_max_sync(kFull, static_cast<unsigned>(lane) * 3u));
    out[9] = static_cast<int>(__reduce_or_sync(kFull, 1u << lane));
    int pred = -1;
    out[10] = static_cast<int>(__match_all_sync(kFull, warp, &pred));
    out[11] = pred;
}

// 32 threads: the half-warps run different collectives with their own masks, then meet.
__device__ void test_disjoint_masks(const HwSimtTestParams& p) {
    const int lane = lane_id();
    int v = lane;
    if (lane < 16) {
        for (int offset = 8; offset > 0; offset /= 2) v += __shfl_xor_sync(0x0000ffffu, v, offset, 16);
        __syncwarp(0x0000ffffu);
    } else {
        __syncwarp(0xffff0000u);
        for (int offset = 8; offset > 0; offset /= 2) v += __shfl_down_sync(0xffff0000u, v, offset, 16);
        v = __shfl_sync(0xffff0000u, v, 16);
    }
    p.out[lane] = v;
    p.out[32 + lane] = __shfl_sync(kFull, v, lane ^ 16);
}

// Block (32, 4, 2) in a grid (2, 1, 3); 6 results per thread.
__device__ void test_block_reductions(const HwSimtTestParams& p) {
    const int t = linear_thread();
    const int block = static_cast<int>(blockIdx.x + blockIdx.z * gridDim.x);
    int* out = p.out + (block * 256 + t) * 6;
    out[0] = __syncthreads_count(t % 3 == 0);
    out[1] = __syncthreads_and(t < 256);
    out[2] = __syncthreads_and(t != 100);
    out[3] = __syncthreads_or(t == 255);
    out[4] = __syncthreads_or(0);
    out[5] = static_cast<int>(threadIdx.x * 10000 + threadIdx.y * 1000 + threadIdx.z * 100 +
                              blockIdx.x * 10 + blockIdx.z);
}

// Block (16, 8, 8) = 1024 threads: warp reductions, then warp 0 reduces the warp sums.
__device__ void test_big_block(const HwSimtTestParams& p) {
    __shared__ int warp_sums[32];
    const int t = linear_thread();
    const int lane = t % 32;
    int v = t;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(kFull, v, offset);
    if (lane == 0) warp_sums[t / 32] = v;
    __syncthreads();
    if (t < 32) {
        int s = warp_sums[lane];
        for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(kFull, s, offset);
        if (lane == 0) p.out[0] = s;
    }
    p.out[1 + t] = __syncthreads_count(1);
}

// 8 blocks of 128 threads.
__device__ void test_atomics(const HwSimtTestParams& p) {
    int* c = p.out;
    const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    atomicAdd(&c[0], 1);
    atomicAdd(reinterpret_cast<unsigned*>(&c[1]), 2u);
    atomicMax(&c[2], t);
    atomicMin(&c[3], -t);
    atomicOr(reinterpret_cast<unsigned*>(&c[4]), 1u << blockIdx.x);
    atomicAnd(reinterpret_cast<unsigned*>(&c[5]), ~(1u << (t % 32)));
    atomicSub(&c[6], 3);
    atomicInc(reinterpret_cast<unsigned*>(&c[7]), 99u);
    atomicExch(&c[8], 42);
    int seen = c[9];
    for (;;) {
        const int assumed = seen;
        seen = atomicCAS(&c[9], assumed, assumed + 5);
        if (seen == assumed) break;
    }
    atomicAdd(reinterpret_cast<unsigned long long*>(&c[10]), 1ull << 33);
    atomicMax(reinterpret_cast<unsigned*>(&c[12]), static_cast<unsigned>(t) * 7u);
    atomicDec(reinterpret_cast<unsigned*>(&c[13]), 1000u);
    atomicAdd(p.out_f, 0.25f);
}

// 3 blocks of 64 threads, 256 floats of dynamic shared memory.
__device__ void test_dynamic_shared(const HwSimtTestParams& p) {
    HW_DYNAMIC_SHARED(float, buffer);
    const int t = static_cast<int>(threadIdx.x);
    int* out = p.out + (blockIdx.x * blockDim.x + t) * 2;
    bool ok = reinterpret_cast<uintptr_t>(buffer) % 16 == 0;
#if HW_SIMT_EMULATOR
    // Poisoned at every block start, although the previous block wrote it.
    ok = ok && __float_as_uint(buffer[t]) == 0xffa5ffa5u && __float_as_uint(buffer[t + 64]) == 0xffa5ffa5u;
#endif
    out[0] = ok;
    __syncthreads();
    buffer[t] = static_cast<float>(blockIdx.x * 100 + t);
    __syncthreads();
    out[1] = static_cast<int>(buffer[blockDim.x - 1 - t]);
}

template <int N>
__device__ int* scratch() {
    __shared__ int s[N];
    return s;
}

// 4 blocks of 128 threads.
__device__ void test_static_shared(const HwSimtTestParams& p) {
    __shared__ int tile[128];
    const int t = static_cast<int>(threadIdx.x);
    tile[t] = static_cast<int>(blockIdx.x) * 1000 + t;
    int* small = scratch<4>();
    int* large = scratch<8>();
    if (t == 0) {
        small[0] = 1;
        large[0] = 2;
    }
    __syncthreads();
    const bool distinct = small != large && small[0] == 1 && large[0] == 2;
    p.out[blockIdx.x * 128 + t] = tile[127 - t] + (distinct ? 0 : 1000000);
}

// One warp: D = A * B + C / 2, A and B tiles of T in global memory, C staged in shared memory.
template <class T, class LayoutA, class LayoutB>
__device__ void wmma_tile(const HwSimtTestParams& p, nvcuda::wmma::layout_t store_layout) {
    using namespace nvcuda;
    __shared__ __align__(32) float c_tile[16 * 16];
    for (int i = static_cast<int>(threadIdx.x); i < 256; i += 32) c_tile[i] = p.in_f[i];
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> b;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.0f);
    wmma::load_matrix_sync(a, static_cast<const T*>(p.in_a), 16);
    wmma::load_matrix_sync(b, static_cast<const T*>(p.in_b), 16);
    wmma::load_matrix_sync(c, c_tile, 16, wmma::mem_row_major);
    for (int i = 0; i < c.num_elements; ++i) c.x[i] *= 0.5f;
    wmma::mma_sync(c, a, b, c);
    wmma::store_matrix_sync(p.out_f, c, 16, store_layout);
}

__device__ void test_wmma_f16(const HwSimtTestParams& p) {
    wmma_tile<__half, nvcuda::wmma::row_major, nvcuda::wmma::col_major>(p, nvcuda::wmma::mem_col_major);
}

__device__ void test_wmma_bf16(const HwSimtTestParams& p) {
    wmma_tile<__nv_bfloat16, nvcuda::wmma::col_major, nvcuda::wmma::row_major>(p, nvcuda::wmma::mem_row_major);
}

// 32 threads: 16-byte vector loads and stores.
__device__ void test_vector_types(const HwSimtTestParams& p) {
    const int t = static_cast<int>(threadIdx.x);
    const float4 v = reinterpret_cast<const float4*>(p.in_f)[t];
    reinterpret_cast<float4*>(p.out_f)[t] = make_float4(v.w, v.z, v.y, v.x);
    const int2 pair = make_int2(t, -t);
    reinterpret_cast<int4*>(p.out)[t] = make_int4(pair.y, pair.x, static_cast<int>(sizeof(float3)),
                                                  static_cast<int>(alignof(uint2)));
}

// Conversions of p.n values: float -> half/bf16 bits, half/bf16 bits -> float bits.
__device__ void test_conversions(const HwSimtTestParams& p) {
    const unsigned short* halves = static_cast<const unsigned short*>(p.in_a);
    const unsigned short* bfloats = static_cast<const unsigned short*>(p.in_b);
    for (int i = static_cast<int>(threadIdx.x); i < p.n; i += static_cast<int>(blockDim.x)) {
        const float x = p.in_f[i];
        p.out_bits[4 * i + 0] = __half_as_ushort(__float2half_rn(x));
        p.out_bits[4 * i + 1] = __bfloat16_as_ushort(__float2bfloat16_rn(x));
        p.out_bits[4 * i + 2] = __float_as_uint(__half2float(__ushort_as_half(halves[i])));
        p.out_bits[4 * i + 3] = __float_as_uint(__bfloat162float(__ushort_as_bfloat16(bfloats[i])));
    }
    if (threadIdx.x == 0) {
        const float2 h = __half22float2(__floats2half2_rn(1.0f / 3.0f, -7.0f));
        const float2 b = __bfloat1622float2(__floats2bfloat162_rn(1.0f / 3.0f, -7.0f));
        const __half2 wide = __float22half2_rn(make_float2(0.5f, 65520.0f));
        p.out_f[0] = h.x;
        p.out_f[1] = h.y;
        p.out_f[2] = b.x;
        p.out_f[3] = b.y;
        p.out_f[4] = __low2float(wide);
        p.out_f[5] = __high2float(wide);
    }
}

// 256 threads. A missing barrier: thread t reads what thread t - 1 wrote. Running the threads
// in index order hides the race; any other order exposes it.
__device__ void test_race(const HwSimtTestParams& p) {
    __shared__ int stage[256];
    const int t = static_cast<int>(threadIdx.x);
    stage[t] = -1;
    __syncthreads();
    stage[t] = 3 * t + 1;
    p.out[t] = stage[t > 0 ? t - 1 : 0];
}

// ---- planted bugs ---------------------------------------------------------------------------

// 32 threads: thread 5 skips a barrier the others wait at.
__device__ void planted_early_return(const HwSimtTestParams& p) {
    if (threadIdx.x == 5) return;
    __syncthreads();  // @planted:early-return
    p.out[threadIdx.x] = 1;
}

// 32 threads: the half-warps wait at different barriers.
__device__ void planted_divergent_barrier(const HwSimtTestParams& p) {
    if (threadIdx.x < 16) {
        __syncthreads();  // @planted:divergent-low
    } else {
        __syncthreads();  // @planted:divergent-high
    }
    p.out[threadIdx.x] = 1;
}

// 32 threads: lane 7 exits, and lane 6 then reads it.
__device__ void planted_lane_exited(const HwSimtTestParams& p) {
    const int lane = lane_id();
    if (lane == 7) return;
    p.out[lane] = __shfl_xor_sync(kFull, lane, 1);  // @planted:lane-exited
}

// 32 threads: lane 0 goes to a different collective than the lanes that wait for it.
__device__ void planted_lane_elsewhere(const HwSimtTestParams& p) {
    const int lane = lane_id();
    int v = lane;
    if (lane == 0) {
        v = static_cast<int>(__ballot_sync(kFull, 1));  // @planted:elsewhere-ballot
    } else {
        v = __shfl_sync(kFull, v, 0);  // @planted:elsewhere-shfl
    }
    p.out[lane] = v;
}

// 32 threads: lane 0's mask leaves lane 0 out.
__device__ void planted_mask_without_self(const HwSimtTestParams& p) {
    __syncwarp(0xfffffffeu);  // @planted:mask-without-self
    p.out[threadIdx.x] = 1;
}

// 32 threads: half the warp shuffles with xor, the other half with down, under one mask.
__device__ void planted_mismatched_collectives(const HwSimtTestParams& p) {
    const int lane = lane_id();
    int v = lane;
    if (lane < 16) {
        v = __shfl_xor_sync(kFull, v, 1);  // @planted:mismatch-xor
    } else {
        v = __shfl_down_sync(kFull, v, 1);  // @planted:mismatch-down
    }
    p.out[lane] = v;
}

// 32 threads: lanes 0, 1 and 2 each wait for the next one, which waits elsewhere.
__device__ void planted_cyclic_wait(const HwSimtTestParams& p) {
    const int lane = lane_id();
    if (lane == 0) {
        __syncwarp(0x3u);  // @planted:cycle-lane0
    } else if (lane == 1) {
        __syncwarp(0x6u);  // @planted:cycle-lane1
    } else if (lane == 2) {
        __syncwarp(0x5u);
    } else {
        __syncwarp(0xfffffff8u);
    }
    p.out[lane] = lane;
}

// 64 threads: in each warp lane 0 waits at the block barrier while its warp-mates wait for it
// at a shuffle; the barrier waits for them in turn.
__device__ void planted_deadlock(const HwSimtTestParams& p) {
    const int lane = lane_id();
    int v = lane;
    if (lane == 0) {
        __syncthreads();  // @planted:deadlock-barrier
    } else {
        v = __shfl_sync(kFull, v, 0);  // @planted:deadlock-shfl
    }
    p.out[threadIdx.x] = v;
}

// 32 threads: a WMMA load 8 bytes past a 256-bit boundary, which faults on the GPU.
__device__ void planted_wmma_misaligned(const HwSimtTestParams& p) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
    nvcuda::wmma::load_matrix_sync(a, static_cast<const __half*>(p.in_a) + 4, 16);  // @planted:wmma-misaligned
    p.out[threadIdx.x] = a.num_elements;
}

// 32 threads: one element past a __shared__ array. Only AddressSanitizer can see this.
__device__ void planted_shared_overrun(const HwSimtTestParams& p) {
    __shared__ int tile[32];
    tile[threadIdx.x + 1] = static_cast<int>(threadIdx.x);  // @planted:shared-overrun
    __syncthreads();
    p.out[threadIdx.x] = tile[threadIdx.x];
}

#define X(name, body, max_threads) HW_KERNEL_ENTRY_BOUNDED(name, HwSimtTestParams, max_threads, body(p))
HW_SIMT_SELFTEST_KERNELS(X)
#undef X
