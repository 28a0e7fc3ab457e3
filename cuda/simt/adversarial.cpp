// Adversarial modes (adversarial.h): parsing, the per-launch WMMA permutations, the dynamic
// shared memory opt-in registry and static shared memory poisoning. The checks themselves sit
// where the behaviour they sharpen lives (sched.cpp, wmma.h).
#include "adversarial.h"

#include <sys/time.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

namespace hw_simt {
namespace {

uint16_t identity[256];
uint16_t drawn[3][256];
Adversarial current;  // launches are serialized (sched.cpp's launch mutex)
uint64_t seed;

thread_local bool tl_has_spec = false;
thread_local Adversarial tl_spec;

std::mutex optin_mutex;
std::map<std::string, uint32_t>& optins() {
    static auto* m = new std::map<std::string, uint32_t>();  // never destroyed, like the emulator
    return *m;
}

bool parse(const char* text, Adversarial* out, char* message, size_t message_len) {
    *out = Adversarial{};
    if (text == nullptr) return true;
    const char* p = text;
    while (*p != '\0') {
        const char* end = std::strchr(p, ',');
        const size_t n = end != nullptr ? static_cast<size_t>(end - p) : std::strlen(p);
        auto is = [&](const char* name) { return std::strlen(name) == n && std::strncmp(p, name, n) == 0; };
        if (is("all")) {
            *out = Adversarial{true, true, true, true, true};
        } else if (is("wmma")) {
            out->wmma = true;
        } else if (is("masks")) {
            out->masks = true;
        } else if (is("its")) {
            out->its = true;
        } else if (is("poison")) {
            out->poison = true;
        } else if (is("smem_optin")) {
            out->smem_optin = true;
        } else if (!is("none") && n > 0) {
            std::snprintf(message, message_len,
                          "HEADWISE_EMU_ADVERSARIAL=\"%s\": \"%.*s\" is not one of all, none, wmma, "
                          "masks, its, poison, smem_optin", text, static_cast<int>(n), p);
            return false;
        }
        p += n;
        if (*p == ',') ++p;
    }
    return true;
}

// splitmix64
uint64_t mix(uint64_t& state) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

struct Init {
    Init() {
        for (int i = 0; i < 256; ++i) identity[i] = static_cast<uint16_t>(i);
    }
} init;

}  // namespace

const uint16_t* wmma_permutations[3] = {identity, identity, identity};

const Adversarial& adversarial() { return current; }
uint64_t adversarial_seed() { return seed; }

bool adversarial_begin_launch(const char*, char* message, size_t message_len) {
    Adversarial modes;
    if (tl_has_spec) {
        modes = tl_spec;
    } else if (!parse(std::getenv("HEADWISE_EMU_ADVERSARIAL"), &modes, message, message_len)) {
        return false;
    }
    current = modes;
    static std::atomic<uint64_t> launches{0};
    timeval now;
    gettimeofday(&now, nullptr);
    uint64_t state = static_cast<uint64_t>(now.tv_sec) * 1000000u +
                     static_cast<uint64_t>(now.tv_usec) + (launches.fetch_add(1) << 40);
    seed = mix(state) >> 1;
    for (int use = 0; use < 3; ++use) {
        if (!modes.wmma) {
            wmma_permutations[use] = identity;
            continue;
        }
        uint16_t* perm = drawn[use];
        do {  // Fisher-Yates; never the identity
            for (int i = 0; i < 256; ++i) perm[i] = static_cast<uint16_t>(i);
            for (int i = 255; i > 0; --i) {
                const int j = static_cast<int>(mix(state) % static_cast<uint64_t>(i + 1));
                const uint16_t t = perm[i];
                perm[i] = perm[j];
                perm[j] = t;
            }
        } while (std::memcmp(perm, identity, sizeof identity) == 0);
        wmma_permutations[use] = perm;
    }
    return true;
}

uint32_t dynamic_shared_limit(const char* kernel) {
    std::lock_guard<std::mutex> lock(optin_mutex);
    const auto it = optins().find(kernel);
    return it == optins().end() || it->second < kDefaultDynamicShared ? kDefaultDynamicShared
                                                                        : it->second;
}

}  // namespace hw_simt

// Static __shared__ variables of non-template functions (types.h puts them in this section).
extern "C" unsigned char __start_hw_simt_shared[] __attribute__((weak));
extern "C" unsigned char __stop_hw_simt_shared[] __attribute__((weak));

namespace hw_simt {

SharedSection static_shared_section() {
    // Weak: without any such variable the linker defines neither bound (the ASan build, too).
    if (__start_hw_simt_shared == nullptr || __stop_hw_simt_shared == nullptr) return {nullptr, 0};
    return {__start_hw_simt_shared, static_cast<size_t>(__stop_hw_simt_shared - __start_hw_simt_shared)};
}

}  // namespace hw_simt

extern "C" {

int hw_simt_set_thread_adversarial(const char* spec, char* message, size_t message_len) {
    using namespace hw_simt;
    if (spec == nullptr) {
        tl_has_spec = false;
        return 0;
    }
    char scratch[1];
    Adversarial parsed;
    if (!parse(spec, &parsed, message != nullptr ? message : scratch,
               message != nullptr ? message_len : sizeof scratch)) {
        return 1;
    }
    tl_spec = parsed;
    tl_has_spec = true;
    return 0;
}

void hw_simt_func_set_max_dynamic_shared(const char* name, size_t len, uint32_t bytes) {
    using namespace hw_simt;
    std::lock_guard<std::mutex> lock(optin_mutex);
    optins()[std::string(name, len)] = bytes;
}

}  // extern "C"
