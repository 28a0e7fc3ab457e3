// Host side of the adversarial modes' self-tests (adversarial_selftest.cu): runs a mode's planted
// bug with that mode off or on and reports whether the kernel came out right. Exposed to Rust
// (src/simt_selftest.rs); tests/simt.rs expects "right" with the mode off, and the emulator's
// report or a wrong result with it on.
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "params.h"
#include "simt/adversarial.h"
#include "simt/selftest.h"

#define HW_SIMT_DECLARE(name) \
    extern "C" int hw_emu_##name(const void* params, const HwLaunch* launch, HwEmuError* err);
HW_SIMT_DECLARE(simt_planted_wmma_layout)
HW_SIMT_DECLARE(simt_planted_mask_exited)
HW_SIMT_DECLARE(simt_planted_missing_syncwarp)
HW_SIMT_DECLARE(simt_planted_uninitialized_shared)
HW_SIMT_DECLARE(simt_planted_smem_no_optin)
HW_SIMT_DECLARE(hw_simt_test_smem_optin)
#undef HW_SIMT_DECLARE

namespace {

using Kernel = int (*)(const void*, const HwLaunch*, HwEmuError*);

int say(char* message, size_t len, const char* format, ...) __attribute__((format(printf, 3, 4)));
int say(char* message, size_t len, const char* format, ...) {
    if (len > 0) {
        va_list args;
        va_start(args, format);
        std::vsnprintf(message, len, format, args);
        va_end(args);
    }
    return 1;
}

int run(Kernel kernel, const HwSimtTestParams& p, uint32_t threads, uint32_t dyn_smem,
        char* message, size_t len) {
    const HwLaunch l{1, 1, 1, threads, 1, 1, dyn_smem};
    HwEmuError err;
    if (kernel(&p, &l, &err) != 0) return say(message, len, "%s", err.message);
    return 0;
}

// The int results out[0..32) against expected(lane).
template <class Expected>
int check(const int32_t* out, Expected expected, const char* what, char* message, size_t len) {
    for (int lane = 0; lane < 32; ++lane) {
        if (out[lane] != expected(lane)) {
            return say(message, len, "%s: lane %d got %d, expected %d", what, lane, out[lane],
                       expected(lane));
        }
    }
    return 0;
}

int planted(const char* mode, char* message, size_t len) {
    alignas(32) float tile[256];
    float out_f[256];
    int32_t out[32];
    HwSimtTestParams p{};
    p.out = out;
    p.out_f = out_f;
    p.in_f = tile;
    for (int i = 0; i < 256; ++i) tile[i] = static_cast<float>(i);
    for (int32_t& v : out) v = -999;
    if (std::strcmp(mode, "wmma") == 0) {
        if (run(hw_emu_simt_planted_wmma_layout, p, 32, 0, message, len) != 0) return 1;
        for (int i = 0; i < 256; ++i) {
            if (out_f[i] != 2.0f * static_cast<float>(i)) {
                return say(message, len, "wmma layout: x[%d] is %g, not tile element %d (%g)", i,
                           static_cast<double>(out_f[i]), i, 2.0 * i);
            }
        }
        return 0;
    }
    if (std::strcmp(mode, "masks") == 0) {
        if (run(hw_emu_simt_planted_mask_exited, p, 32, 0, message, len) != 0) return 1;
        return check(out, [](int lane) { return lane < 16 ? 0xffff : -999; }, "ballot", message, len);
    }
    if (std::strcmp(mode, "its") == 0) {
        if (run(hw_emu_simt_planted_missing_syncwarp, p, 32, 0, message, len) != 0) return 1;
        return check(out, [](int lane) { return lane > 0 ? lane : 1; }, "missing __syncwarp: stale read",
                     message, len);
    }
    if (std::strcmp(mode, "poison") == 0) {
        if (run(hw_emu_simt_planted_uninitialized_shared, p, 32, 0, message, len) != 0) return 1;
        return check(out, [](int) { return 1; }, "uninitialized shared memory", message, len);
    }
    if (std::strcmp(mode, "smem_optin") == 0) {
        // The opted-in kernel must launch in any mode; the other one only without the check.
        hw_simt_func_set_max_dynamic_shared("hw_simt_test_smem_optin", std::strlen("hw_simt_test_smem_optin"),
                                            64 * 1024);
        if (run(hw_emu_hw_simt_test_smem_optin, p, 32, 64 * 1024, message, len) != 0) {
            const int r = say(message, len, "opted-in launch failed");
            return r + 1;  // 2: not the planted bug
        }
        if (check(out, [](int lane) { return lane; }, "big dynamic shared memory", message, len) != 0) return 2;
        if (run(hw_emu_simt_planted_smem_no_optin, p, 32, 64 * 1024, message, len) != 0) return 1;
        return check(out, [](int lane) { return lane; }, "big dynamic shared memory", message, len);
    }
    say(message, len, "no adversarial mode named \"%s\"", mode);
    return 2;
}

}  // namespace

extern "C" {

// Runs the planted bug of adversarial mode `mode` with only that mode on (`on` != 0) or none,
// whatever HEADWISE_EMU_ADVERSARIAL says, under the calling thread's schedule. 0: the kernel's
// results came out right; 1: the emulator's report or the first wrong result in `message`;
// 2: no such mode, or a setup failure.
int hw_simt_selftest_adversarial(const char* mode, int on, char* message, size_t message_len) {
    if (hw_simt_set_thread_adversarial(on != 0 ? mode : "none", message, message_len) != 0) return 2;
    const int status = planted(mode, message, message_len);
    hw_simt_set_thread_adversarial(nullptr, nullptr, 0);
    return status;
}

}  // extern "C"
