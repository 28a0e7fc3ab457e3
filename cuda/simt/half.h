// __half and __nv_bfloat16 for host builds, without the CUDA toolkit.
//
// Every conversion is bit-identical to the toolkit's own host code paths (cuda_fp16.hpp and
// cuda_bf16.hpp, CUDA 13.0): round to nearest even, subnormals kept, overflow to infinity, and
// NaN handled as the toolkit does it: float -> half/bf16 gives the canonical 0x7fff whatever the
// NaN's sign or payload, half -> float gives 0x7fffffff, bf16 -> float keeps the bits.
// float -> half and float -> bf16 were checked against the toolkit over all 2^32 floats, the
// reverse directions over all 2^16 inputs. Arithmetic goes through float and rounds once at the
// end, which is exact for + - * / (float carries more than 2p + 2 bits for p = 11 and p = 8, so
// rounding twice cannot differ from rounding once).
#pragma once

#include <cstdint>
#include <cstring>

#include "types.h"

namespace hw_simt {
namespace fp {

inline uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
inline float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// r is a truncated result and rem the bits shifted out of it, left-aligned: round to nearest,
// ties to even. A carry out of the significand correctly bumps the exponent (up to infinity).
inline uint32_t round_nearest_even(uint32_t r, uint32_t rem) {
    return r + ((rem > 0x80000000u || (rem == 0x80000000u && (r & 1u))) ? 1u : 0u);
}

inline uint16_t float_to_half(float f) {
    const uint32_t x = bits_of(f);
    const uint32_t u = x & 0x7fffffffu;
    const uint32_t sign = (x >> 16) & 0x8000u;
    if (u >= 0x7f800000u) return static_cast<uint16_t>(u == 0x7f800000u ? (sign | 0x7c00u) : 0x7fffu);
    if (u > 0x477fefffu) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
    if (u >= 0x38800000u) {                                              // normal half
        return static_cast<uint16_t>(round_nearest_even(sign | ((u - 0x38000000u) >> 13), u << 19));
    }
    if (u < 0x33000001u) return static_cast<uint16_t>(sign);  // at most half the least subnormal
    // Subnormal half: shift the significand, implicit bit included, into place.
    const uint32_t shift = 0x7eu - (u >> 23);
    const uint32_t mantissa = (u & 0x7fffffu) | 0x800000u;
    return static_cast<uint16_t>(round_nearest_even(sign | (mantissa >> shift), mantissa << (32u - shift)));
}

inline float half_to_float(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = static_cast<uint32_t>(h & 0x3ffu) << 13;
    if (exponent == 0x1fu) {
        if (mantissa != 0) return float_of(0x7fffffffu);  // the toolkit drops sign and payload
        exponent = 0xffu;
    } else if (exponent == 0) {
        if (mantissa != 0) {  // subnormal half: normalize (every one is a normal float)
            const uint32_t shift = static_cast<uint32_t>(__builtin_clz(mantissa)) - 8u;
            mantissa = (mantissa << shift) & 0x7fffffu;  // leading bit becomes the implicit one
            exponent = 0x71u - shift;
        }
    } else {
        exponent += 0x70u;
    }
    return float_of(sign | (exponent << 23) | mantissa);
}

inline uint16_t float_to_bfloat16(float f) {
    const uint32_t x = bits_of(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return static_cast<uint16_t>(round_nearest_even(x >> 16, x << 16));
}

inline float bfloat16_to_float(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }

// Wider sources (double, 64-bit integers) are narrowed to float first. Rounding that step to odd
// (truncate, then set the last bit if anything was lost) keeps the final round-to-nearest-even
// exact; the toolkit's host code does the same for bf16 and an equivalent shift trick for half.
inline float round_to_odd(float nearest, bool nearest_is_above, bool inexact) {
    uint32_t u = bits_of(nearest);
    if (!inexact) return nearest;
    if (nearest_is_above) --u;  // towards zero: magnitudes grow with the bit pattern
    return float_of(u | 1u);
}
inline float double_to_float_odd(double d) {
    const float f = static_cast<float>(d);
    if (d != d) return f;
    const double back = static_cast<double>(f);
    return round_to_odd(f, (d > 0.0) ? (back > d) : (back < d), back != d);
}
inline float ll_to_float_odd(long long v) {
    const float f = static_cast<float>(v);
    // float(v) <= 2^63 compares exactly against v only through an unsigned detour at the top.
    const bool above = (v > 0) ? (f >= 9223372036854775808.0f || static_cast<long long>(f) > v)
                               : (static_cast<long long>(f) < v);
    const bool inexact = (f >= 9223372036854775808.0f) || static_cast<long long>(f) != v;
    return round_to_odd(f, above, inexact);
}
inline float ull_to_float_odd(unsigned long long v) {
    const float f = static_cast<float>(v);
    const bool overflow = f >= 18446744073709551616.0f;
    const bool above = overflow || static_cast<unsigned long long>(f) > v;
    const bool inexact = overflow || static_cast<unsigned long long>(f) != v;
    return round_to_odd(f, above, inexact);
}

}  // namespace fp
}  // namespace hw_simt

struct __half_raw {
    unsigned short x;
};
struct __nv_bfloat16_raw {
    unsigned short x;
};

// Same shape as the toolkit's classes: implicit conversions from the arithmetic types and to
// float, bits reachable only through the _raw structs and the __*_as_ushort functions.
#define HW_SIMT_HALF_CLASS(T, Raw, from_float, to_float, from_ll, from_ull)                       \
    struct __attribute__((aligned(2))) T {                                                        \
      protected:                                                                                  \
        unsigned short __x;                                                                       \
                                                                                                  \
      public:                                                                                     \
        T() = default;                                                                            \
        constexpr T(const Raw& r) : __x(r.x) {}                                                   \
        T(float f) : __x(hw_simt::fp::from_float(f)) {}                                           \
        T(double d) : __x(hw_simt::fp::from_float(hw_simt::fp::double_to_float_odd(d))) {}       \
        T(short v) : T(static_cast<int>(v)) {}                                                    \
        T(unsigned short v) : T(static_cast<int>(v)) {}                                           \
        T(int v) : T(static_cast<double>(v)) {}                                                   \
        T(unsigned int v) : T(static_cast<double>(v)) {}                                          \
        T(long v) : T(static_cast<long long>(v)) {}                                               \
        T(unsigned long v) : T(static_cast<unsigned long long>(v)) {}                             \
        T(long long v) : __x(hw_simt::fp::from_float(hw_simt::fp::from_ll(v))) {}                 \
        T(unsigned long long v) : __x(hw_simt::fp::from_float(hw_simt::fp::from_ull(v))) {}       \
        T& operator=(const Raw& r) {                                                              \
            __x = r.x;                                                                            \
            return *this;                                                                         \
        }                                                                                         \
        operator Raw() const { return Raw{__x}; }                                                 \
        operator float() const { return hw_simt::fp::to_float(__x); }                             \
    };

HW_SIMT_HALF_CLASS(__half, __half_raw, float_to_half, half_to_float, ll_to_float_odd,
                   ull_to_float_odd)
HW_SIMT_HALF_CLASS(__nv_bfloat16, __nv_bfloat16_raw, float_to_bfloat16, bfloat16_to_float,
                   ll_to_float_odd, ull_to_float_odd)
#undef HW_SIMT_HALF_CLASS

struct __attribute__((aligned(4))) __half2 {
    __half x, y;
    __half2() = default;
    __half2(__half a, __half b) : x(a), y(b) {}
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;
    __nv_bfloat162() = default;
    __nv_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) : x(a), y(b) {}
};

typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

// ---- conversions ----------------------------------------------------------------------------

inline __half __float2half(float a) { return __half(a); }
inline __half __float2half_rn(float a) { return __half(a); }
inline __half __double2half(double a) { return __half(a); }
inline float __half2float(__half a) { return static_cast<float>(a); }
inline __half2 __float2half2_rn(float a) { return __half2(__half(a), __half(a)); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__half(a), __half(b)); }
inline __half2 __float22half2_rn(float2 a) { return __half2(__half(a.x), __half(a.y)); }
inline float2 __half22float2(__half2 a) { return make_float2(float(a.x), float(a.y)); }
inline float __low2float(__half2 a) { return float(a.x); }
inline float __high2float(__half2 a) { return float(a.y); }
inline __half __low2half(__half2 a) { return a.x; }
inline __half __high2half(__half2 a) { return a.y; }
inline __half2 __halves2half2(__half lo, __half hi) { return __half2(lo, hi); }
inline __half2 __half2half2(__half a) { return __half2(a, a); }
inline unsigned short __half_as_ushort(__half h) { return static_cast<__half_raw>(h).x; }
inline short __half_as_short(__half h) { return static_cast<short>(static_cast<__half_raw>(h).x); }
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline __half __short_as_half(short s) { return __half(__half_raw{static_cast<unsigned short>(s)}); }

inline __nv_bfloat16 __float2bfloat16(float a) { return __nv_bfloat16(a); }
inline __nv_bfloat16 __float2bfloat16_rn(float a) { return __nv_bfloat16(a); }
inline __nv_bfloat16 __double2bfloat16(double a) { return __nv_bfloat16(a); }
inline float __bfloat162float(__nv_bfloat16 a) { return static_cast<float>(a); }
inline __nv_bfloat162 __float2bfloat162_rn(float a) {
    return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(a));
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(b));
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 a) {
    return __nv_bfloat162(__nv_bfloat16(a.x), __nv_bfloat16(a.y));
}
inline float2 __bfloat1622float2(__nv_bfloat162 a) { return make_float2(float(a.x), float(a.y)); }
inline float __low2float(__nv_bfloat162 a) { return float(a.x); }
inline float __high2float(__nv_bfloat162 a) { return float(a.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 a) { return a.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 a) { return a.y; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return __nv_bfloat162(lo, hi);
}
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162(a, a); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) {
    return static_cast<__nv_bfloat16_raw>(h).x;
}
inline short __bfloat16_as_short(__nv_bfloat16 h) {
    return static_cast<short>(static_cast<__nv_bfloat16_raw>(h).x);
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    return __nv_bfloat16(__nv_bfloat16_raw{u});
}
inline __nv_bfloat16 __short_as_bfloat16(short s) {
    return __nv_bfloat16(__nv_bfloat16_raw{static_cast<unsigned short>(s)});
}

// ---- arithmetic and comparisons (through float, rounded once) ------------------------------

#define HW_SIMT_HALF_MATH(T, T2, raw_of)                                                          \
    inline T __hadd(T a, T b) { return T(float(a) + float(b)); }                                  \
    inline T __hsub(T a, T b) { return T(float(a) - float(b)); }                                  \
    inline T __hmul(T a, T b) { return T(float(a) * float(b)); }                                  \
    inline T __hdiv(T a, T b) { return T(float(a) / float(b)); }                                  \
    inline T __hneg(T a) { return T(-float(a)); }                                                 \
    inline T __habs(T a) { return T(__builtin_fabsf(float(a))); }                                 \
    inline bool __hisnan(T a) { return float(a) != float(a); }                                    \
    inline int __hisinf(T a) {                                                                    \
        const float f = float(a);                                                                 \
        return f == __builtin_inff() ? 1 : (f == -__builtin_inff() ? -1 : 0);                     \
    }                                                                                             \
    inline bool __heq(T a, T b) { return float(a) == float(b); }                                  \
    inline bool __hne(T a, T b) { return float(a) != float(b) && !__hisnan(a) && !__hisnan(b); }  \
    inline bool __hlt(T a, T b) { return float(a) < float(b); }                                   \
    inline bool __hle(T a, T b) { return float(a) <= float(b); }                                  \
    inline bool __hgt(T a, T b) { return float(a) > float(b); }                                   \
    inline bool __hge(T a, T b) { return float(a) >= float(b); }                                  \
    /* NaN loses to a number; +0 beats -0 (the toolkit's rules). */                               \
    inline T __hmax(T a, T b) {                                                                   \
        if (__hisnan(a) && __hisnan(b)) return T(__builtin_nanf(""));                             \
        if (__hisnan(b) || float(a) > float(b)) return a;                                         \
        if (__hisnan(a) || float(b) > float(a)) return b;                                         \
        return raw_of(a) > raw_of(b) ? b : a;                                                     \
    }                                                                                             \
    inline T __hmin(T a, T b) {                                                                   \
        if (__hisnan(a) && __hisnan(b)) return T(__builtin_nanf(""));                             \
        if (__hisnan(b) || float(a) < float(b)) return a;                                         \
        if (__hisnan(a) || float(b) < float(a)) return b;                                         \
        return raw_of(a) > raw_of(b) ? a : b;                                                     \
    }                                                                                             \
    inline T operator+(T a, T b) { return __hadd(a, b); }                                         \
    inline T operator-(T a, T b) { return __hsub(a, b); }                                         \
    inline T operator*(T a, T b) { return __hmul(a, b); }                                         \
    inline T operator/(T a, T b) { return __hdiv(a, b); }                                         \
    inline T& operator+=(T& a, T b) { return a = __hadd(a, b); }                                  \
    inline T& operator-=(T& a, T b) { return a = __hsub(a, b); }                                  \
    inline T& operator*=(T& a, T b) { return a = __hmul(a, b); }                                  \
    inline T& operator/=(T& a, T b) { return a = __hdiv(a, b); }                                  \
    inline T operator+(T a) { return a; }                                                         \
    inline T operator-(T a) { return __hneg(a); }                                                 \
    inline bool operator==(T a, T b) { return __heq(a, b); }                                      \
    inline bool operator!=(T a, T b) { return !__heq(a, b); }                                     \
    inline bool operator<(T a, T b) { return __hlt(a, b); }                                       \
    inline bool operator<=(T a, T b) { return __hle(a, b); }                                      \
    inline bool operator>(T a, T b) { return __hgt(a, b); }                                       \
    inline bool operator>=(T a, T b) { return __hge(a, b); }                                      \
    inline T2 __hadd2(T2 a, T2 b) { return T2(__hadd(a.x, b.x), __hadd(a.y, b.y)); }              \
    inline T2 __hsub2(T2 a, T2 b) { return T2(__hsub(a.x, b.x), __hsub(a.y, b.y)); }              \
    inline T2 __hmul2(T2 a, T2 b) { return T2(__hmul(a.x, b.x), __hmul(a.y, b.y)); }              \
    inline T2 __h2div(T2 a, T2 b) { return T2(__hdiv(a.x, b.x), __hdiv(a.y, b.y)); }              \
    inline T2 operator+(T2 a, T2 b) { return __hadd2(a, b); }                                     \
    inline T2 operator-(T2 a, T2 b) { return __hsub2(a, b); }                                     \
    inline T2 operator*(T2 a, T2 b) { return __hmul2(a, b); }                                     \
    inline T2 operator/(T2 a, T2 b) { return __h2div(a, b); }

HW_SIMT_HALF_MATH(__half, __half2, __half_as_ushort)
HW_SIMT_HALF_MATH(__nv_bfloat16, __nv_bfloat162, __bfloat16_as_ushort)
#undef HW_SIMT_HALF_MATH
