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

// Counted accesses: ld_global/st_global for global memory, ld_shared/st_shared for shared
// memory. Under nvcc they are the plain load/store (`*p`, `*p = v`; __forceinline__, same SASS,
// so a uint4 load stays LDG.E.128). Under the emulator they also record (address, bytes, call
// site, thread) for the memory-traffic counts (cuda/simt/traffic.h) when counting is on. Only
// accesses written through these are counted. (HW_SIMT_EMULATOR is 0 under nvcc: test with #if.)
#if HW_SIMT_EMULATOR
template <typename T>
inline T ld_global(const T* p, int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    if (::hw_simt::traffic_on) ::hw_simt::traffic_record(p, sizeof(T), false, false, file, line);
    return *p;
}
template <typename T>
inline void st_global(T* p, const T& v, int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    if (::hw_simt::traffic_on) ::hw_simt::traffic_record(p, sizeof(T), true, false, file, line);
    *p = v;
}
template <typename T>
inline T ld_shared(const T* p, int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    if (::hw_simt::traffic_on) ::hw_simt::traffic_record(p, sizeof(T), false, true, file, line);
    return *p;
}
template <typename T>
inline void st_shared(T* p, const T& v, int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    if (::hw_simt::traffic_on) ::hw_simt::traffic_record(p, sizeof(T), true, true, file, line);
    *p = v;
}
#else
template <typename T>
__device__ __forceinline__ T ld_global(const T* p) {
    return *p;
}
template <typename T>
__device__ __forceinline__ void st_global(T* p, const T& v) {
    *p = v;
}
template <typename T>
__device__ __forceinline__ T ld_shared(const T* p) {
    return *p;
}
template <typename T>
__device__ __forceinline__ void st_shared(T* p, const T& v) {
    *p = v;
}
#endif

}  // namespace hw
