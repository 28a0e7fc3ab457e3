// f16/bf16 <-> f32 for whole 16-byte vectors. Kernels are templated on the element type and go
// through these, so one kernel body serves both dtypes.
#pragma once
#include "compat.cuh"
#include "vec.cuh"

namespace hw {

template <typename T>
struct Kv;

template <>
struct Kv<__half> {
    __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
    __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Kv<__nv_bfloat16> {
    __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// 8 elements of one uint4 to f32. By value: a reference into global memory lets nvcc split the
// 16-byte load into eight LDG.E.U16 (tests/ptxas_budget.rs checks for LDG.E.128).
template <typename T>
__device__ __forceinline__ void unpack8(const uint4 v, float (&out)[8]) {
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = Kv<T>::to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&in)[8]) {
    uint4 v;
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = Kv<T>::from_float(in[i]);
    return v;
}

// Stages `rows` consecutive rows of a [..][D] tensor of T, from row `first`, into shared memory
// as f32 (dst[r * D + e]), 16-byte loads shared by the block's `threads` threads: how decode
// attention and the H2O mass kernel hold a query group. No barrier: the caller syncs before use.
template <typename T, int D>
__device__ __forceinline__ void stage_rows_f32(const void* src, int64_t first, int rows, float* dst, int tid,
                                               int threads) {
    const uint4* v = row_vec(src, first, D);
    for (int i = tid; i < rows * (D / kElemsPerVec); i += threads) {
        float f[8];
        unpack8<T>(ld_global(v + i), f);
#pragma unroll
        for (int j = 0; j < 8; ++j) st_shared(&dst[i * 8 + j], f[j]);
    }
}

}  // namespace hw
