// Host side of the emulator's self-tests: builds the inputs, launches the kernels of selftest.cu
// through the emulator and checks every result exactly. Exposed to Rust (src/simt_selftest.rs)
// as a few extern "C" functions; tests/simt.rs runs them.
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "params.h"
#include "simt/half.h"
#include "simt/selftest.h"

#define X(name, body, max_threads) \
    extern "C" int hw_emu_##name(const void* params, const HwLaunch* launch, HwEmuError* err);
HW_SIMT_SELFTEST_KERNELS(X)
#undef X

extern "C" int hw_simt_built_with_asan(void);

namespace {

using Kernel = int (*)(const void*, const HwLaunch*, HwEmuError*);

// Collects the first failure of a test into the caller's buffer.
class Report {
  public:
    Report(char* buffer, size_t capacity) : buffer_(buffer), capacity_(capacity) {
        if (capacity_ > 0) buffer_[0] = '\0';
    }
    bool fail(const char* format, ...) __attribute__((format(printf, 2, 3))) {
        if (!failed_ && capacity_ > 0) {
            va_list args;
            va_start(args, format);
            std::vsnprintf(buffer_, capacity_, format, args);
            va_end(args);
        }
        failed_ = true;
        return false;
    }

  private:
    char* buffer_;
    size_t capacity_;
    bool failed_ = false;
};

HwLaunch config(uint32_t gx, uint32_t gy, uint32_t gz, uint32_t bx, uint32_t by, uint32_t bz,
                uint32_t dyn_smem = 0) {
    return HwLaunch{gx, gy, gz, bx, by, bz, dyn_smem};
}

HwLaunch threads(uint32_t count, uint32_t dyn_smem = 0) {
    return config(1, 1, 1, count, 1, 1, dyn_smem);
}

bool launch(Report& r, const char* name, Kernel kernel, const HwSimtTestParams& p,
            const HwLaunch& l) {
    HwEmuError err;
    if (kernel(&p, &l, &err) != 0) return r.fail("%s: unexpected emulator error: %s", name, err.message);
    return true;
}

template <class T>
bool expect(Report& r, const char* what, size_t index, T got, T want) {
    if (got == want) return true;
    return r.fail("%s[%zu] = %lld, expected %lld", what, index, static_cast<long long>(got),
                  static_cast<long long>(want));
}

bool expect_bits(Report& r, const char* what, size_t index, uint32_t got, uint32_t want) {
    if (got == want) return true;
    return r.fail("%s[%zu] = 0x%08x, expected 0x%08x", what, index, got, want);
}

bool expect_float(Report& r, const char* what, size_t index, float got, float want) {
    uint32_t g, w;
    std::memcpy(&g, &got, 4);
    std::memcpy(&w, &want, 4);
    if (g == w) return true;
    return r.fail("%s[%zu] = %.9g (0x%08x), expected %.9g (0x%08x)", what, index, got, g, want, w);
}

float float_of(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// ---- semantics ------------------------------------------------------------------------------

bool shuffles(Report& r) {
    std::vector<int32_t> out(64 * 12, -999);
    HwSimtTestParams p{};
    p.out = out.data();
    if (!launch(r, "shuffles", hw_emu_simt_test_shuffles, p, threads(64))) return false;
    for (int t = 0; t < 64; ++t) {
        const int l = t % 32;
        const int want[12] = {
            ((l + 3) % 32) * 10,
            (l & ~7) | 5,
            (l & 16) | ((l + 35) & 15),
            l >= 3 ? l - 3 : l,
            (l & 7) >= 2 ? l - 2 : l,
            l + 5 < 32 ? l + 5 : l,
            (l & 15) + 3 < 16 ? l + 3 : l,
            l ^ 9,
            l < 16 ? l : l - 16,  // xor reaches into an earlier segment, never a later one
            (31 - l) * 100 + 7,
            l ^ 2,
            496,
        };
        for (int k = 0; k < 12; ++k)
            if (!expect(r, "shuffles", static_cast<size_t>(t * 12 + k), out[t * 12 + k], want[k])) return false;
    }
    return true;
}

bool votes(Report& r) {
    std::vector<int32_t> out(72 * 12, -999);
    HwSimtTestParams p{};
    p.out = out.data();
    if (!launch(r, "votes", hw_emu_simt_test_votes, p, threads(72))) return false;
    for (int t = 0; t < 72; ++t) {
        const int l = t % 32;
        const bool partial = t >= 64;  // the third warp has lanes 0..7 only
        const uint32_t lanes = partial ? 0xffu : 0xffffffffu;
        uint32_t want[12];
        if (t < 16) {
            want[0] = (1u << 0) | (1u << 3) | (1u << 6) | (1u << 9) | (1u << 12) | (1u << 15);
            want[1] = 0;
            want[2] = 1;
        } else if (t < 32) {
            want[0] = (1u << 18) | (1u << 21) | (1u << 24) | (1u << 27) | (1u << 30);
            want[1] = 1;
            want[2] = 0;
        } else {
            want[0] = want[1] = want[2] = 0xffffffffu;  // -1: not run
        }
        want[3] = lanes;
        want[4] = lanes;
        want[5] = 0xfu << (l / 4 * 4);
        want[6] = partial ? 28 : 496;
        want[7] = static_cast<uint32_t>(-10);
        want[8] = partial ? 21 : 93;
        want[9] = lanes;
        want[10] = lanes;
        want[11] = 1;
        for (int k = 0; k < 12; ++k) {
            if (!expect_bits(r, "votes", static_cast<size_t>(t * 12 + k),
                             static_cast<uint32_t>(out[t * 12 + k]), want[k]))
                return false;
        }
    }
    return true;
}

bool disjoint_masks(Report& r) {
    std::vector<int32_t> out(64, -999);
    HwSimtTestParams p{};
    p.out = out.data();
    if (!launch(r, "disjoint_masks", hw_emu_simt_test_disjoint_masks, p, threads(32))) return false;
    for (int l = 0; l < 32; ++l) {
        if (!expect(r, "disjoint_masks", static_cast<size_t>(l), out[l], l < 16 ? 120 : 376)) return false;
        if (!expect(r, "disjoint_masks", static_cast<size_t>(32 + l), out[32 + l], l < 16 ? 376 : 120))
            return false;
    }
    return true;
}

bool block_reductions(Report& r) {
    std::vector<int32_t> out(6 * 256 * 6, -999);
    HwSimtTestParams p{};
    p.out = out.data();
    if (!launch(r, "block_reductions", hw_emu_simt_test_block_reductions, p, config(2, 1, 3, 32, 4, 2)))
        return false;
    for (int bz = 0; bz < 3; ++bz) {
        for (int bx = 0; bx < 2; ++bx) {
            for (int t = 0; t < 256; ++t) {
                const int x = t % 32, y = (t / 32) % 4, z = t / 128;
                const int want[6] = {86, 1, 0, 1, 0, x * 10000 + y * 1000 + z * 100 + bx * 10 + bz};
                const size_t base = static_cast<size_t>(((bx + bz * 2) * 256 + t) * 6);
                for (int k = 0; k < 6; ++k)
                    if (!expect(r, "block_reductions", base + k, out[base + k], want[k])) return false;
            }
        }
    }
    return true;
}

bool big_block(Report& r) {
    std::vector<int32_t> out(1 + 1024, -999);
    HwSimtTestParams p{};
    p.out = out.data();
    if (!launch(r, "big_block", hw_emu_simt_test_big_block, p, config(1, 1, 1, 16, 8, 8))) return false;
    if (!expect(r, "big_block", 0, out[0], 1023 * 1024 / 2)) return false;
    for (size_t t = 0; t < 1024; ++t)
        if (!expect(r, "big_block", 1 + t, out[1 + t], 1024)) return false;
    return true;
}

bool atomics(Report& r) {
    alignas(8) int32_t c[14] = {0, 0, -1, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    float f = 0.0f;
    HwSimtTestParams p{};
    p.out = c;
    p.out_f = &f;
    if (!launch(r, "atomics", hw_emu_simt_test_atomics, p, config(8, 1, 1, 128, 1, 1))) return false;
    const int32_t want[10] = {1024, 2048, 1023, -1023, 0xff, 0, -3072, 24, 42, 5120};
    for (size_t k = 0; k < 10; ++k)
        if (!expect(r, "atomics", k, c[k], want[k])) return false;
    uint64_t wide;
    std::memcpy(&wide, &c[10], sizeof wide);
    if (!expect<uint64_t>(r, "atomics(u64)", 10, wide, 1ull << 43)) return false;
    if (!expect(r, "atomics", 12, c[12], 1023 * 7)) return false;
    // atomicDec wraps 0 -> 1000, reaches 0 after 1001 steps, wraps again, then 22 more steps.
    if (!expect(r, "atomics", 13, c[13], 978)) return false;
    return expect_float(r, "atomics(float)", 0, f, 256.0f);
}

bool dynamic_shared(Report& r) {
    std::vector<int32_t> out(3 * 64 * 2, -999);
    HwSimtTestParams p{};
    p.out = out.data();
    if (!launch(r, "dynamic_shared", hw_emu_simt_test_dynamic_shared, p, config(3, 1, 1, 64, 1, 1, 256 * 4)))
        return false;
    for (int b = 0; b < 3; ++b) {
        for (int t = 0; t < 64; ++t) {
            const size_t i = static_cast<size_t>((b * 64 + t) * 2);
            if (!expect(r, "dynamic_shared(aligned and poisoned)", i, out[i], 1)) return false;
            if (!expect(r, "dynamic_shared", i + 1, out[i + 1], b * 100 + 63 - t)) return false;
        }
    }
    return true;
}

bool static_shared(Report& r) {
    std::vector<int32_t> out(4 * 128, -999);
    HwSimtTestParams p{};
    p.out = out.data();
    if (!launch(r, "static_shared", hw_emu_simt_test_static_shared, p, config(4, 1, 1, 128, 1, 1)))
        return false;
    for (int b = 0; b < 4; ++b)
        for (int t = 0; t < 128; ++t)
            if (!expect(r, "static_shared", static_cast<size_t>(b * 128 + t), out[b * 128 + t], b * 1000 + 127 - t))
                return false;
    return true;
}

// Exactly representable in f16 and bf16, so that the products are exact too.
float tile_a(int m, int k) { return static_cast<float>((m * 3 + k * 5) % 11 - 5) * 0.125f; }
float tile_b(int k, int n) { return static_cast<float>((k * 7 + n * 2) % 9 - 4) * 0.25f; }
float tile_c(int m, int n) { return static_cast<float>(m - n) * 0.75f; }

// D = A * B + C / 2, accumulated as the emulator documents (C first, then k = 0..15).
bool wmma(Report& r, const char* name, Kernel kernel, bool bf16) {
    alignas(32) uint16_t a[256], b[256];
    alignas(32) float c[256], d[256];
    for (int i = 0; i < 16; ++i) {
        for (int j = 0; j < 16; ++j) {
            // f16: A row-major, B column-major. bf16: A column-major, B row-major.
            const int a_index = bf16 ? j * 16 + i : i * 16 + j;  // A(m = i, k = j)
            const int b_index = bf16 ? i * 16 + j : j * 16 + i;  // B(k = i, n = j)
            a[a_index] = bf16 ? hw_simt::fp::float_to_bfloat16(tile_a(i, j)) : hw_simt::fp::float_to_half(tile_a(i, j));
            b[b_index] = bf16 ? hw_simt::fp::float_to_bfloat16(tile_b(i, j)) : hw_simt::fp::float_to_half(tile_b(i, j));
            c[i * 16 + j] = tile_c(i, j);
            d[i * 16 + j] = -999.0f;
        }
    }
    HwSimtTestParams p{};
    p.in_a = a;
    p.in_b = b;
    p.in_f = c;
    p.out_f = d;
    if (!launch(r, name, kernel, p, threads(32))) return false;
    for (int m = 0; m < 16; ++m) {
        for (int n = 0; n < 16; ++n) {
            float want = tile_c(m, n) * 0.5f;
            for (int k = 0; k < 16; ++k) want += tile_a(m, k) * tile_b(k, n);
            const int index = bf16 ? m * 16 + n : n * 16 + m;  // stored row- / column-major
            if (!expect_float(r, name, static_cast<size_t>(index), d[index], want)) return false;
        }
    }
    return true;
}

bool wmma_f16(Report& r) { return wmma(r, "wmma_f16", hw_emu_simt_test_wmma_f16, false); }
bool wmma_bf16(Report& r) { return wmma(r, "wmma_bf16", hw_emu_simt_test_wmma_bf16, true); }

bool vector_types(Report& r) {
    alignas(16) float in[128], out_f[128];
    alignas(16) int32_t out[128];
    for (int i = 0; i < 128; ++i) {
        in[i] = static_cast<float>(i) * 1.5f;
        out_f[i] = -999.0f;
        out[i] = -999;
    }
    HwSimtTestParams p{};
    p.in_f = in;
    p.out_f = out_f;
    p.out = out;
    if (!launch(r, "vector_types", hw_emu_simt_test_vector_types, p, threads(32))) return false;
    for (int t = 0; t < 32; ++t) {
        for (int k = 0; k < 4; ++k) {
            const size_t i = static_cast<size_t>(t * 4 + k);
            if (!expect_float(r, "vector_types(float4)", i, out_f[i], in[t * 4 + 3 - k])) return false;
        }
        const int32_t want[4] = {-t, t, 12, 8};
        for (int k = 0; k < 4; ++k)
            if (!expect(r, "vector_types(int4)", static_cast<size_t>(t * 4 + k), out[t * 4 + k], want[k])) return false;
    }
    return true;
}

// Expected bit patterns, worked out from IEEE 754 by hand (and matching the CUDA toolkit).
struct NarrowCase {
    uint32_t f32;
    uint16_t f16, bf16;
};
const NarrowCase kNarrowCases[] = {
    {0x00000000, 0x0000, 0x0000},  // +0
    {0x80000000, 0x8000, 0x8000},  // -0
    {0x3f800000, 0x3c00, 0x3f80},  // 1
    {0xc0200000, 0xc100, 0xc020},  // -2.5
    {0x3dcccccd, 0x2e66, 0x3dcd},  // 0.1
    {0x477fe000, 0x7bff, 0x4780},  // 65504, the largest half
    {0x477fefff, 0x7bff, 0x4780},  // just below the half overflow threshold
    {0x477ff000, 0x7c00, 0x4780},  // 65520 ties to even: infinity
    {0x501502f9, 0x7c00, 0x5015},  // 1e10
    {0xd01502f9, 0xfc00, 0xd015},  // -1e10
    {0x7f7fffff, 0x7c00, 0x7f80},  // FLT_MAX: bf16 rounds up to infinity
    {0x7f7f7fff, 0x7c00, 0x7f7f},  // just below the bf16 tie
    {0x7f7f8000, 0x7c00, 0x7f80},  // bf16 tie, odd: up to infinity
    {0x7f800000, 0x7c00, 0x7f80},  // +inf
    {0xff800000, 0xfc00, 0xff80},  // -inf
    {0x7fc00000, 0x7fff, 0x7fff},  // NaN: canonical
    {0xffc00001, 0x7fff, 0x7fff},  // negative NaN with payload: canonical, sign dropped
    {0x7f800001, 0x7fff, 0x7fff},  // signaling NaN
    {0x33800000, 0x0001, 0x3380},  // 2^-24, the least half subnormal
    {0x33000000, 0x0000, 0x3300},  // 2^-25 ties to even: zero
    {0x33000001, 0x0001, 0x3300},  // just above: rounds up
    {0x33c00000, 0x0002, 0x33c0},  // 1.5 * 2^-24 ties to even: 2 * 2^-24
    {0x387fc000, 0x03ff, 0x3880},  // the largest half subnormal
    {0x38800000, 0x0400, 0x3880},  // 2^-14, the least half normal
    {0x3f801000, 0x3c00, 0x3f80},  // 1 + 2^-11: half tie, even stays
    {0x3f803000, 0x3c02, 0x3f80},  // 1 + 3 * 2^-11: half tie, odd rounds up
    {0x3f801001, 0x3c01, 0x3f80},  // just above the half tie
    {0x3f808000, 0x3c04, 0x3f80},  // 1 + 2^-8: bf16 tie, even stays
    {0x3f818000, 0x3c0c, 0x3f82},  // 1 + 3 * 2^-8: bf16 tie, odd rounds up
    {0x00000001, 0x0000, 0x0000},  // the least float subnormal
    {0x00008000, 0x0000, 0x0000},  // bf16 tie at zero
    {0x00018000, 0x0000, 0x0002},  // bf16 tie, odd rounds up
    {0x00400000, 0x0000, 0x0040},  // a float subnormal exact in bf16
};

struct WidenCase {
    uint16_t bits;
    uint32_t from_f16, from_bf16;
};
const WidenCase kWidenCases[] = {
    {0x0000, 0x00000000, 0x00000000},
    {0x8000, 0x80000000, 0x80000000},
    {0x0001, 0x33800000, 0x00010000},  // least half subnormal; a bf16 subnormal
    {0x8001, 0xb3800000, 0x80010000},
    {0x03ff, 0x387fc000, 0x03ff0000},  // largest half subnormal
    {0x0400, 0x38800000, 0x04000000},
    {0x3c00, 0x3f800000, 0x3c000000},
    {0x7bff, 0x477fe000, 0x7bff0000},
    {0x7c00, 0x7f800000, 0x7c000000},
    {0xfc00, 0xff800000, 0xfc000000},
    {0x7e00, 0x7fffffff, 0x7e000000},  // half NaN: canonical float NaN
    {0xfe01, 0x7fffffff, 0xfe010000},  // negative half NaN: sign and payload dropped
    {0x7f80, 0x7fffffff, 0x7f800000},  // half NaN; bf16 +inf
    {0x7fc1, 0x7fffffff, 0x7fc10000},  // bf16 NaN keeps its payload
    {0xff80, 0x7fffffff, 0xff800000},
};

bool conversions(Report& r) {
    const size_t narrow = sizeof kNarrowCases / sizeof kNarrowCases[0];
    const size_t widen = sizeof kWidenCases / sizeof kWidenCases[0];
    const size_t n = narrow > widen ? narrow : widen;
    std::vector<float> in(n, 0.0f);
    std::vector<uint16_t> halves(n, 0), bfloats(n, 0);
    for (size_t i = 0; i < narrow; ++i) in[i] = float_of(kNarrowCases[i].f32);
    for (size_t i = 0; i < widen; ++i) halves[i] = bfloats[i] = kWidenCases[i].bits;
    std::vector<uint32_t> out(4 * n, 0xdeadbeefu);
    float pairs[6] = {};
    HwSimtTestParams p{};
    p.in_f = in.data();
    p.in_a = halves.data();
    p.in_b = bfloats.data();
    p.out_bits = out.data();
    p.out_f = pairs;
    p.n = static_cast<int32_t>(n);
    if (!launch(r, "conversions", hw_emu_simt_test_conversions, p, threads(32))) return false;
    for (size_t i = 0; i < narrow; ++i) {
        if (!expect_bits(r, "float->half", i, out[4 * i], kNarrowCases[i].f16)) return false;
        if (!expect_bits(r, "float->bf16", i, out[4 * i + 1], kNarrowCases[i].bf16)) return false;
    }
    for (size_t i = 0; i < widen; ++i) {
        if (!expect_bits(r, "half->float", i, out[4 * i + 2], kWidenCases[i].from_f16)) return false;
        if (!expect_bits(r, "bf16->float", i, out[4 * i + 3], kWidenCases[i].from_bf16)) return false;
    }
    const uint32_t want_pairs[6] = {
        0x3eaaa000,  // half(1/3) = 0x3555
        0xc0e00000,  // -7
        0x3eab0000,  // bf16(1/3) = 0x3eab
        0xc0e00000,
        0x3f000000,  // 0.5
        0x7f800000,  // 65520 -> half infinity
    };
    for (size_t k = 0; k < 6; ++k) {
        uint32_t got;
        std::memcpy(&got, &pairs[k], 4);
        if (!expect_bits(r, "pair conversions", k, got, want_pairs[k])) return false;
    }
    return true;
}

// Invalid launches are refused with a reason, and the emulator keeps working afterwards.
bool launch_errors(Report& r) {
    std::vector<int32_t> out(64 * 12, 0);
    std::vector<float> out_f(128, 0.0f);
    HwSimtTestParams p{};
    p.out = out.data();
    struct Case {
        Kernel kernel;
        const void* params;
        HwLaunch launch;
        const char* reason;
    };
    const Case cases[] = {
        {hw_emu_simt_test_shuffles, &p, threads(1025), "exceeds CUDA's limits"},
        {hw_emu_simt_test_shuffles, &p, config(1, 1, 1, 8, 8, 65), "exceeds CUDA's limits"},
        {hw_emu_simt_test_shuffles, &p, config(1, 0, 1, 32, 1, 1), "zero dimension"},
        {hw_emu_simt_test_shuffles, &p, config(1, 1, 1, 0, 1, 1), "zero dimension"},
        {hw_emu_simt_test_shuffles, &p, config(1, 65536, 1, 32, 1, 1), "exceeds CUDA's limits"},
        {hw_emu_simt_test_shuffles, &p, threads(64, 228 * 1024), "dynamic shared memory"},
        {hw_emu_simt_test_bounded, &p, threads(128), "__launch_bounds__ of 64"},
        {hw_emu_simt_test_shuffles, nullptr, threads(64), "params is null"},
    };
    for (const Case& c : cases) {
        HwEmuError err;
        err.message[0] = '\0';
        if (c.kernel(c.params, &c.launch, &err) == 0) return r.fail("launch accepted; expected \"%s\"", c.reason);
        if (std::strstr(err.message, c.reason) == nullptr)
            return r.fail("message \"%s\" does not say \"%s\"", err.message, c.reason);
    }
    if (hw_emu_simt_test_shuffles(&p, nullptr, nullptr) == 0)
        return r.fail("a null launch configuration was accepted");
    return shuffles(r);
}

// After a kernel error the emulator abandons that kernel's threads; the next launch must work.
bool recovery(Report& r) {
    std::vector<int32_t> out(64, 0);
    HwSimtTestParams p{};
    p.out = out.data();
    const HwLaunch l = threads(64);
    HwEmuError err;
    if (hw_emu_simt_planted_deadlock(&p, &l, &err) == 0) return r.fail("the planted deadlock was not reported");
    return shuffles(r) && big_block(r);
}

// ---- planted bugs ---------------------------------------------------------------------------

// Runs a kernel that must fail; returns its status and message as they are.
int planted(Kernel kernel, uint32_t block_threads, char* message, size_t message_len) {
    alignas(32) uint16_t tile[512] = {};
    std::vector<int32_t> out(block_threads, 0);
    HwSimtTestParams p{};
    p.out = out.data();
    p.in_a = tile;
    const HwLaunch l = threads(block_threads);
    HwEmuError err;
    const int status = kernel(&p, &l, &err);
    if (message_len > 0) std::snprintf(message, message_len, "%s", status != 0 ? err.message : "");
    return status;
}

struct PositiveTest {
    const char* name;
    bool (*run)(Report&);
};
const PositiveTest kPositiveTests[] = {
    {"shuffles", shuffles},
    {"votes", votes},
    {"disjoint_masks", disjoint_masks},
    {"block_reductions", block_reductions},
    {"big_block", big_block},
    {"atomics", atomics},
    {"dynamic_shared", dynamic_shared},
    {"static_shared", static_shared},
    {"wmma_f16", wmma_f16},
    {"wmma_bf16", wmma_bf16},
    {"vector_types", vector_types},
    {"conversions", conversions},
    {"launch_errors", launch_errors},
    {"recovery", recovery},
};

struct PlantedTest {
    const char* name;
    Kernel kernel;
    uint32_t block_threads;
};
const PlantedTest kPlantedTests[] = {
    {"planted_early_return", hw_emu_simt_planted_early_return, 32},
    {"planted_divergent_barrier", hw_emu_simt_planted_divergent_barrier, 32},
    {"planted_lane_exited", hw_emu_simt_planted_lane_exited, 32},
    {"planted_lane_elsewhere", hw_emu_simt_planted_lane_elsewhere, 32},
    {"planted_mask_without_self", hw_emu_simt_planted_mask_without_self, 32},
    {"planted_mismatched_collectives", hw_emu_simt_planted_mismatched_collectives, 32},
    {"planted_cyclic_wait", hw_emu_simt_planted_cyclic_wait, 32},
    {"planted_deadlock", hw_emu_simt_planted_deadlock, 64},
    {"planted_wmma_misaligned", hw_emu_simt_planted_wmma_misaligned, 32},
};

}  // namespace

extern "C" {

// Runs the self-test `name`. Positive tests return 0 when every result is exact, else 1 with the
// first discrepancy in `message`. Planted-bug tests ("planted_*") return the emulator's verdict
// as is: 1 with its report (the expected outcome), or 0 if the bug went unnoticed. 2: no such
// test.
int hw_simt_selftest(const char* name, char* message, size_t message_len) {
    for (const PositiveTest& test : kPositiveTests) {
        if (std::strcmp(name, test.name) != 0) continue;
        Report report(message, message_len);
        return test.run(report) ? 0 : 1;
    }
    for (const PlantedTest& test : kPlantedTests) {
        if (std::strcmp(name, test.name) == 0) return planted(test.kernel, test.block_threads, message, message_len);
    }
    if (message_len > 0) std::snprintf(message, message_len, "no self-test named \"%s\"", name);
    return 2;
}

// Runs the kernel with a missing barrier once under the calling thread's schedule and counts the
// threads that read a stale value (0 in forward order, most of them otherwise).
int hw_simt_selftest_race(int32_t* wrong, char* message, size_t message_len) {
    std::vector<int32_t> out(256, -999);
    HwSimtTestParams p{};
    p.out = out.data();
    Report report(message, message_len);
    if (!launch(report, "race", hw_emu_simt_test_race, p, threads(256))) return 1;
    int32_t count = 0;
    for (int t = 0; t < 256; ++t) count += out[t] != 3 * (t > 0 ? t - 1 : 0) + 1;
    *wrong = count;
    return 0;
}

// Writes one element past a __shared__ array. Under AddressSanitizer the process dies with a
// report naming the line; without it the write would silently corrupt a neighbouring variable,
// so it is refused (returns 1).
int hw_simt_selftest_shared_overrun(char* message, size_t message_len) {
    if (!hw_simt_built_with_asan()) {
        if (message_len > 0) std::snprintf(message, message_len, "not built with AddressSanitizer");
        return 1;
    }
    return planted(hw_emu_simt_planted_shared_overrun, 32, message, message_len);
}

}  // extern "C"
