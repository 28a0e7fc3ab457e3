// CUDA device intrinsics for host builds: math, bit manipulation, memory, atomics, fences.
//
// The fast-math intrinsics (__expf, __logf, ...) are computed exactly here, while the GPU uses
// approximations with a few ulp of error: kernels must be compared against references with a
// tolerance anyway, and the emulator's job is control flow and data movement, not reproducing
// the special-function unit.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>

#include "runtime.h"

// ---- math ------------------------------------------------------------------------------------

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
// Same structure as the GPU (scale by log2(e), then a base-2 exponential / logarithm).
inline float __expf(float x) { return exp2f(x * 1.44269504088896340736f); }
inline float __logf(float x) { return log2f(x) * 0.693147180559945309417f; }
inline float __log2f(float x) { return log2f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }

// CUDA's min/max overload set (crt/math_functions.hpp): mixed signed/unsigned pairs compare as
// unsigned, floating-point forms behave like fmin/fmax.
#define HW_SIMT_MINMAX(R, A, B)                                                                   \
    inline R min(A a, B b) { return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a)    \
                                                                          : static_cast<R>(b); } \
    inline R max(A a, B b) { return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a)    \
                                                                          : static_cast<R>(b); }
HW_SIMT_MINMAX(int, int, int)
HW_SIMT_MINMAX(unsigned int, unsigned int, unsigned int)
HW_SIMT_MINMAX(unsigned int, int, unsigned int)
HW_SIMT_MINMAX(unsigned int, unsigned int, int)
HW_SIMT_MINMAX(long, long, long)
HW_SIMT_MINMAX(unsigned long, unsigned long, unsigned long)
HW_SIMT_MINMAX(unsigned long, long, unsigned long)
HW_SIMT_MINMAX(unsigned long, unsigned long, long)
HW_SIMT_MINMAX(long long, long long, long long)
HW_SIMT_MINMAX(unsigned long long, unsigned long long, unsigned long long)
HW_SIMT_MINMAX(unsigned long long, long long, unsigned long long)
HW_SIMT_MINMAX(unsigned long long, unsigned long long, long long)
#undef HW_SIMT_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }
inline unsigned int umin(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int umax(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long llmin(long long a, long long b) { return a < b ? a : b; }
inline long long llmax(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// ---- conversions and reinterpretation --------------------------------------------------------

namespace hw_simt {
namespace detail {
template <class To, class From>
inline To bit_cast(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
    To out;
    std::memcpy(&out, &v, sizeof out);
    return out;
}
// cvt.rni/rzi/rmi/rpi.s32.f32: NaN gives 0, out-of-range values saturate.
inline int float_to_int_saturating(float rounded) {
    if (rounded != rounded) return 0;
    if (rounded >= 2147483648.0f) return 2147483647;
    if (rounded < -2147483648.0f) return -2147483647 - 1;
    return static_cast<int>(rounded);
}
inline unsigned float_to_uint_saturating(float rounded) {
    if (rounded != rounded || rounded <= 0.0f) return 0;
    if (rounded >= 4294967296.0f) return 4294967295u;
    return static_cast<unsigned>(rounded);
}
}  // namespace detail
}  // namespace hw_simt

inline int __float_as_int(float x) { return hw_simt::detail::bit_cast<int>(x); }
inline unsigned int __float_as_uint(float x) { return hw_simt::detail::bit_cast<unsigned int>(x); }
inline float __int_as_float(int x) { return hw_simt::detail::bit_cast<float>(x); }
inline float __uint_as_float(unsigned int x) { return hw_simt::detail::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return hw_simt::detail::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return hw_simt::detail::bit_cast<double>(x); }
// rintf rounds half to even in the default rounding mode, which kernels never change.
inline int __float2int_rn(float x) { return hw_simt::detail::float_to_int_saturating(rintf(x)); }
inline int __float2int_rz(float x) { return hw_simt::detail::float_to_int_saturating(truncf(x)); }
inline int __float2int_rd(float x) { return hw_simt::detail::float_to_int_saturating(floorf(x)); }
inline int __float2int_ru(float x) { return hw_simt::detail::float_to_int_saturating(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return hw_simt::detail::float_to_uint_saturating(rintf(x)); }
inline unsigned __float2uint_rz(float x) { return hw_simt::detail::float_to_uint_saturating(truncf(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }

// ---- bit manipulation ------------------------------------------------------------------------

inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
    return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
    return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) |
           __brev(static_cast<unsigned>(x >> 32));
}
// prmt.b32 default mode: each selector nibble (low 3 bits) picks a byte of {y:x}.
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    const unsigned long long bytes = (static_cast<unsigned long long>(y) << 32) | x;
    unsigned int r = 0;
    for (int i = 0; i < 4; ++i) r |= ((bytes >> (((s >> (4 * i)) & 7u) * 8)) & 0xffu) << (8 * i);
    return r;
}
inline unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int shift) {
    const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
    return static_cast<unsigned int>((v << (shift & 31u)) >> 32);
}
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int shift) {
    const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
    return static_cast<unsigned int>(v >> (shift & 31u));
}
inline int __mulhi(int x, int y) {
    return static_cast<int>((static_cast<long long>(x) * y) >> 32);
}
inline unsigned int __umulhi(unsigned int x, unsigned int y) {
    return static_cast<unsigned int>((static_cast<unsigned long long>(x) * y) >> 32);
}
inline long long __mul64hi(long long x, long long y) {
    return static_cast<long long>((static_cast<__int128>(x) * y) >> 64);
}
inline unsigned long long __umul64hi(unsigned long long x, unsigned long long y) {
    return static_cast<unsigned long long>((static_cast<unsigned __int128>(x) * y) >> 64);
}

// ---- memory ----------------------------------------------------------------------------------

template <class T>
inline T __ldg(const T* p) { return *p; }

// The emulator is sequentially consistent (one OS thread, switches only at collectives), so
// fences have nothing to order.
inline void __threadfence() { hw_simt::yield_point(); }
inline void __threadfence_block() { hw_simt::yield_point(); }
inline void __threadfence_system() {}

[[noreturn]] inline void __trap(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    hw_simt::kernel_error(file, line, "__trap() called");
}

// ---- atomics ---------------------------------------------------------------------------------
// Plain read-modify-write is atomic here: emulated threads never interleave inside a function
// that has no collective in it.

#define HW_SIMT_ATOMIC(name, T, update)                                                           \
    inline T name(T* address, T val) {                                                            \
        hw_simt::yield_point();                                                                   \
        const T old = *address;                                                                   \
        *address = (update);                                                                      \
        return old;                                                                               \
    }
HW_SIMT_ATOMIC(atomicAdd, int, old + val)
HW_SIMT_ATOMIC(atomicAdd, unsigned int, old + val)
HW_SIMT_ATOMIC(atomicAdd, unsigned long long, old + val)
HW_SIMT_ATOMIC(atomicAdd, float, old + val)
HW_SIMT_ATOMIC(atomicAdd, double, old + val)
HW_SIMT_ATOMIC(atomicSub, int, old - val)
HW_SIMT_ATOMIC(atomicSub, unsigned int, old - val)
HW_SIMT_ATOMIC(atomicExch, int, val)
HW_SIMT_ATOMIC(atomicExch, unsigned int, val)
HW_SIMT_ATOMIC(atomicExch, unsigned long long, val)
HW_SIMT_ATOMIC(atomicExch, float, val)
HW_SIMT_ATOMIC(atomicMin, int, val < old ? val : old)
HW_SIMT_ATOMIC(atomicMin, unsigned int, val < old ? val : old)
HW_SIMT_ATOMIC(atomicMin, long long, val < old ? val : old)
HW_SIMT_ATOMIC(atomicMin, unsigned long long, val < old ? val : old)
HW_SIMT_ATOMIC(atomicMax, int, val > old ? val : old)
HW_SIMT_ATOMIC(atomicMax, unsigned int, val > old ? val : old)
HW_SIMT_ATOMIC(atomicMax, long long, val > old ? val : old)
HW_SIMT_ATOMIC(atomicMax, unsigned long long, val > old ? val : old)
HW_SIMT_ATOMIC(atomicAnd, int, old & val)
HW_SIMT_ATOMIC(atomicAnd, unsigned int, old & val)
HW_SIMT_ATOMIC(atomicAnd, unsigned long long, old & val)
HW_SIMT_ATOMIC(atomicOr, int, old | val)
HW_SIMT_ATOMIC(atomicOr, unsigned int, old | val)
HW_SIMT_ATOMIC(atomicOr, unsigned long long, old | val)
HW_SIMT_ATOMIC(atomicXor, int, old ^ val)
HW_SIMT_ATOMIC(atomicXor, unsigned int, old ^ val)
HW_SIMT_ATOMIC(atomicXor, unsigned long long, old ^ val)
// ((old >= val) ? 0 : (old + 1)) and (((old == 0) || (old > val)) ? val : (old - 1)).
HW_SIMT_ATOMIC(atomicInc, unsigned int, old >= val ? 0u : old + 1u)
HW_SIMT_ATOMIC(atomicDec, unsigned int, (old == 0u || old > val) ? val : old - 1u)
#undef HW_SIMT_ATOMIC

#define HW_SIMT_ATOMIC_CAS(T)                                                                     \
    inline T atomicCAS(T* address, T compare, T val) {                                            \
        hw_simt::yield_point();                                                                   \
        const T old = *address;                                                                   \
        if (old == compare) *address = val;                                                       \
        return old;                                                                               \
    }
HW_SIMT_ATOMIC_CAS(int)
HW_SIMT_ATOMIC_CAS(unsigned int)
HW_SIMT_ATOMIC_CAS(unsigned long long)
HW_SIMT_ATOMIC_CAS(unsigned short)
#undef HW_SIMT_ATOMIC_CAS
