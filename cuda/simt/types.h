// CUDA keywords and built-in types for host builds of kernel sources.
#pragma once

#include <cstdint>

// Function-space qualifiers mean nothing on the host: every function is an ordinary C++ function.
#define __global__
#define __device__
#define __host__
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// Blocks run one after another on one OS thread, so a block's shared memory can be a static
// variable; launches are serialized so no two blocks ever use it at once. Unlike the GPU, a
// block sees the previous block's values in static __shared__ variables (zeros in the very first
// block); only dynamic shared memory (HW_DYNAMIC_SHARED) is poisoned at every block start, and
// under HEADWISE_EMU_ADVERSARIAL=poison also the variables of non-template functions, which the
// section attribute gathers (GCC ignores it for statics of template functions: COMDAT).
// This also works inside templates and device helpers (one variable per instantiation).
#if defined(HW_SIMT_ASAN)
// AddressSanitizer puts no redzones around globals in a named section, and its overrun check of
// static shared memory is the stronger one in that build: there, poison mode finds none.
#define __shared__ static
#else
#define __shared__ static __attribute__((section("hw_simt_shared")))
#endif
// Kernel files are separate modules on the GPU; `static` keeps them separate here too.
#define __constant__ static

// CUDA's vector types with CUDA's sizes and alignments (vector_types.h), so that structs and
// vector loads lay out exactly as on the device.
#define HW_SIMT_VEC1(T, name, align) \
    struct __attribute__((aligned(align))) name { T x; }; \
    inline name make_##name(T x) { return name{x}; }
#define HW_SIMT_VEC2(T, name, align) \
    struct __attribute__((aligned(align))) name { T x, y; }; \
    inline name make_##name(T x, T y) { return name{x, y}; }
#define HW_SIMT_VEC3(T, name, align) \
    struct __attribute__((aligned(align))) name { T x, y, z; }; \
    inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define HW_SIMT_VEC4(T, name, align) \
    struct __attribute__((aligned(align))) name { T x, y, z, w; }; \
    inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }

HW_SIMT_VEC1(signed char, char1, 1)
HW_SIMT_VEC2(signed char, char2, 2)
HW_SIMT_VEC3(signed char, char3, 1)
HW_SIMT_VEC4(signed char, char4, 4)
HW_SIMT_VEC1(unsigned char, uchar1, 1)
HW_SIMT_VEC2(unsigned char, uchar2, 2)
HW_SIMT_VEC3(unsigned char, uchar3, 1)
HW_SIMT_VEC4(unsigned char, uchar4, 4)
HW_SIMT_VEC1(short, short1, 2)
HW_SIMT_VEC2(short, short2, 4)
HW_SIMT_VEC3(short, short3, 2)
HW_SIMT_VEC4(short, short4, 8)
HW_SIMT_VEC1(unsigned short, ushort1, 2)
HW_SIMT_VEC2(unsigned short, ushort2, 4)
HW_SIMT_VEC3(unsigned short, ushort3, 2)
HW_SIMT_VEC4(unsigned short, ushort4, 8)
HW_SIMT_VEC1(int, int1, 4)
HW_SIMT_VEC2(int, int2, 8)
HW_SIMT_VEC3(int, int3, 4)
HW_SIMT_VEC4(int, int4, 16)
HW_SIMT_VEC1(unsigned int, uint1, 4)
HW_SIMT_VEC2(unsigned int, uint2, 8)
HW_SIMT_VEC3(unsigned int, uint3, 4)
HW_SIMT_VEC4(unsigned int, uint4, 16)
HW_SIMT_VEC1(long long, longlong1, 8)
HW_SIMT_VEC2(long long, longlong2, 16)
HW_SIMT_VEC3(long long, longlong3, 8)
HW_SIMT_VEC1(unsigned long long, ulonglong1, 8)
HW_SIMT_VEC2(unsigned long long, ulonglong2, 16)
HW_SIMT_VEC3(unsigned long long, ulonglong3, 8)
HW_SIMT_VEC1(float, float1, 4)
HW_SIMT_VEC2(float, float2, 8)
HW_SIMT_VEC3(float, float3, 4)
HW_SIMT_VEC4(float, float4, 16)
HW_SIMT_VEC1(double, double1, 8)
HW_SIMT_VEC2(double, double2, 16)
HW_SIMT_VEC3(double, double3, 8)

#undef HW_SIMT_VEC1
#undef HW_SIMT_VEC2
#undef HW_SIMT_VEC3
#undef HW_SIMT_VEC4

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
        : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// The built-in variables. Plain globals rather than thread_local: launches hold a global mutex
// and fibers never migrate between OS threads, so one copy is correct, and the scheduler
// rewrites threadIdx at every fiber switch (blockIdx at every block, the dims at every launch).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;
