// 16-byte vector access to K/V rows. Rows are head_dim 16-bit elements; head_dim is a multiple
// of 8 for every supported size, so a row is a whole number of uint4 and every row start is
// 16-byte aligned when the buffer is (the host checks buffer alignment before launch).
#pragma once
#include "compat.cuh"

namespace hw {

constexpr int kElemsPerVec = 8;  // 16 bytes of f16/bf16

__device__ __forceinline__ const uint4* row_vec(const void* base, int64_t row, int head_dim) {
    return reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + row * head_dim);
}

__device__ __forceinline__ uint4* row_vec(void* base, int64_t row, int head_dim) {
    return reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + row * head_dim);
}

}  // namespace hw
